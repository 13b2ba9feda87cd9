"""lightning_cil: class-incremental learning on PyTorch Lightning."""

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
