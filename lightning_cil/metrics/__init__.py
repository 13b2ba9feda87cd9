"""Stream metrics: per-task accuracy (torchmetrics), the accuracy matrix with its summaries, a run's metrics.json.

``TaskAccuracy`` is imported on first use: the accuracy matrix and the metrics file need only NumPy, so the offline
report loads neither torch nor Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_cil.metrics.accuracy_matrix import (
    AccuracyMatrix,
    average_forgetting,
    backward_transfer,
    forgetting_per_task,
)
from lightning_cil.metrics.run_file import METRICS_FILE, read_metrics

if TYPE_CHECKING:
    from lightning_cil.metrics.task_accuracy import TaskAccuracy

__all__ = [
    "METRICS_FILE",
    "AccuracyMatrix",
    "TaskAccuracy",
    "average_forgetting",
    "backward_transfer",
    "forgetting_per_task",
    "read_metrics",
]


def __getattr__(name: str) -> Any:
    if name == "TaskAccuracy":
        from lightning_cil.metrics.task_accuracy import TaskAccuracy

        return TaskAccuracy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
