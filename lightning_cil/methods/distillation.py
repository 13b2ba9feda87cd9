"""The previous model as a frozen teacher, and the distillation loss: shared by LwF, iCaRL, WA and BiC."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_cil.data.scenario import TaskInfo
from lightning_cil.methods.base import IncrementalModule
from lightning_cil.networks import IncrementalLinear

__all__ = ["DistillationModule", "kd_loss"]


def kd_loss(logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al.'s soft-target distillation as PyCIL computes it for LwF, iCaRL (``kd``), WA and BiC: the
    cross-entropy -sum_c softmax(teacher / T)_c log softmax(student / T)_c, averaged over the batch.

    There is no T^2 factor: the reference weights (LwF's lambda 3, WA's and BiC's old / seen share) were set for
    this scale, and with T^2 they would act 4 times as strong at T = 2. ``logits`` are the student's scores for the
    teacher's classes. (The cross-entropy and the KL divergence differ by the teacher's entropy, a constant, so
    their gradients are equal.)
    """
    t = temperature
    log_student = F.log_softmax(logits.float() / t, dim=1)
    return -(F.softmax(teacher_logits.float() / t, dim=1) * log_student).sum(1).mean()


class DistillationModule(IncrementalModule):
    """A method that keeps the model of the previous task as a frozen teacher (backbone + head).

    The teacher is copied at each task start from the second task on; its BatchNorm statistics stay frozen.
    Checkpoints record its number of classes so loading can rebuild it before the weights go in.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.old_model: nn.Module | None = None

    @property
    def num_old_classes(self) -> int:
        return 0 if self.old_model is None else self.old_model[1].out_features

    def on_task_start(self, task: TaskInfo) -> None:
        if task.index > 0:
            self.old_model = nn.Sequential(copy.deepcopy(self.backbone), copy.deepcopy(self.head))
            self.old_model.requires_grad_(False).eval()
        super().on_task_start(task)

    @torch.no_grad()
    def teacher_logits(self, images: Tensor) -> Tensor:
        """The previous model's logits, in fp32 (the targets of distillation, also under mixed precision)."""
        return self.old_model(images).float()

    def weighted_distillation_loss(self, logits: Tensor, labels: Tensor, images: Tensor, temperature: float) -> Tensor:
        """(1 - lambda) CE over all seen classes + lambda KD on the old classes, lambda = old / seen classes:
        PyCIL's weighting for WA and BiC, which lets distillation weigh more as the old classes outnumber the new."""
        loss = F.cross_entropy(logits, labels)
        old = self.num_old_classes
        if not old:
            return loss
        share = old / logits.shape[1]
        return (1 - share) * loss + share * kd_loss(logits[:, :old], self.teacher_logits(images), temperature)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.old_model is not None:
            self.old_model.eval()  # the teacher's BatchNorm statistics stay frozen
        return self

    def architecture(self) -> dict[str, Any]:
        return {**super().architecture(), "teacher_classes": self.num_old_classes}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        classes = checkpoint["lightning_cil"]["teacher_classes"]
        if classes:
            head = IncrementalLinear(self.backbone.out_dim, classes)
            self.old_model = nn.Sequential(copy.deepcopy(self.backbone), head).requires_grad_(False).eval()
