"""Top-1 / top-5 accuracy per task from one evaluation pass, synchronised across processes."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["TaskAccuracy"]


class TaskAccuracy(Metric):
    """Counts correct predictions per task group; the group of a sample is its task id.

    Counts (not means) are the state, so ranks sum exactly and "accuracy on all seen classes" is the
    sample-weighted accuracy the papers report.
    """

    full_state_update = False

    def __init__(self, num_tasks: int, top_k: int = 5) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.top_k = top_k
        self.add_state("correct", torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("correct_top_k", torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: Tensor, labels: Tensor, tasks: Tensor) -> None:
        scores = scores.float()
        hit = (scores.argmax(dim=1) == labels).long()
        k = min(self.top_k, scores.shape[1])
        hit_k = (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1).long()
        # out of place: after an evaluation under inference mode (``trainer.test``) the reset states are inference
        # tensors, which a validation inside the next fit (``val_during_fit``, the sanity check) may not modify
        self.correct = self.correct.index_add(0, tasks, hit)
        self.correct_top_k = self.correct_top_k.index_add(0, tasks, hit_k)
        self.total = self.total.index_add(0, tasks, torch.ones_like(hit))

    def compute(self) -> dict[str, Tensor]:
        """Per-task accuracy (NaN for tasks without samples) and the counts behind it."""
        total = self.total.clamp(min=1).double()
        per_task = torch.where(self.total > 0, self.correct / total, torch.nan)
        return {"per_task": per_task, "correct": self.correct, "correct_top_k": self.correct_top_k, "total": self.total}
