"""Stream metrics: per-task accuracy (torchmetrics) and the accuracy matrix with its summaries."""

from lightning_cil.metrics.accuracy_matrix import (
    AccuracyMatrix,
    average_forgetting,
    backward_transfer,
    forgetting_per_task,
)
from lightning_cil.metrics.task_accuracy import TaskAccuracy

__all__ = ["AccuracyMatrix", "TaskAccuracy", "average_forgetting", "backward_transfer", "forgetting_per_task"]
