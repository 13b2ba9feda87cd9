"""lightning_cil: class-incremental learning on PyTorch Lightning.

The public names load on first use (PEP 562), so ``lightning-cil report`` and other tools that read only a run's
files do not import torch, Lightning and every method.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_cil.data import TaskInfo, TaskStreamDataModule
    from lightning_cil.methods import (
        DER,
        EWC,
        WA,
        BiC,
        Finetune,
        ICaRL,
        IncrementalModule,
        Joint,
        LwF,
        PackNet,
        Piggyback,
        TaskSchedule,
    )
    from lightning_cil.stream import TaskStream, run_stream

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(("TaskInfo", "TaskStreamDataModule"), "lightning_cil.data"),
    **dict.fromkeys(
        (
            "BiC",
            "DER",
            "EWC",
            "Finetune",
            "ICaRL",
            "IncrementalModule",
            "Joint",
            "LwF",
            "PackNet",
            "Piggyback",
            "TaskSchedule",
            "WA",
        ),
        "lightning_cil.methods",
    ),
    **dict.fromkeys(("TaskStream", "run_stream"), "lightning_cil.stream"),
}

__all__ = [
    "BiC",
    "DER",
    "EWC",
    "Finetune",
    "ICaRL",
    "IncrementalModule",
    "Joint",
    "LwF",
    "PackNet",
    "Piggyback",
    "TaskInfo",
    "TaskSchedule",
    "TaskStream",
    "TaskStreamDataModule",
    "WA",
    "__version__",
    "run_stream",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
