"""Task streams: datasets, scenarios and the TaskStreamDataModule."""

from lightning_cil.data.datamodule import TaskDataset, TaskStreamDataModule
from lightning_cil.data.datasets import DATASETS, DatasetError, imagenet_subset
from lightning_cil.data.huggingface import HuggingFaceDataset
from lightning_cil.data.memory import ExemplarMemory
from lightning_cil.data.scenario import PROTOCOLS, StreamLayout, TaskInfo
from lightning_cil.data.task_data import TaskData, TrainingPlan

__all__ = [
    "DATASETS",
    "PROTOCOLS",
    "DatasetError",
    "ExemplarMemory",
    "HuggingFaceDataset",
    "StreamLayout",
    "TaskData",
    "TaskDataset",
    "TaskInfo",
    "TaskStreamDataModule",
    "TrainingPlan",
    "imagenet_subset",
]
