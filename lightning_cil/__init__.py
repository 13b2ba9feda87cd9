"""lightning_cil: class-incremental learning on PyTorch Lightning.

The public names load on first use (PEP 562), so ``lightning-cil report`` and other tools that read only a run's
files do not import torch, Lightning and every method.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

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


#: where each public name is defined (every other name of ``__all__`` comes from ``lightning_cil.methods``)
_MODULE_OF = {
    "TaskInfo": "lightning_cil.data",
    "TaskStreamDataModule": "lightning_cil.data",
    "TaskStream": "lightning_cil.stream",
    "run_stream": "lightning_cil.stream",
}


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(import_module(_MODULE_OF.get(name, "lightning_cil.methods")), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
