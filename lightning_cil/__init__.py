"""lightning_cil: class-incremental learning on PyTorch Lightning."""

from lightning_cil.data import TaskInfo, TaskStreamDataModule
from lightning_cil.methods import DER, Finetune, ICaRL, IncrementalModule, Joint, PackNet, Piggyback, TaskSchedule
from lightning_cil.stream import TaskStream, run_stream

__version__ = "0.1.0"

__all__ = [
    "DER",
    "Finetune",
    "ICaRL",
    "IncrementalModule",
    "Joint",
    "PackNet",
    "Piggyback",
    "TaskInfo",
    "TaskSchedule",
    "TaskStream",
    "TaskStreamDataModule",
    "__version__",
    "run_stream",
]
