"""WA: weight aligning (Zhao et al., CVPR 2020)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_cil.data.memory import Selection
from lightning_cil.data.scenario import TaskInfo
from lightning_cil.methods.base import TaskSchedule
from lightning_cil.methods.distillation import DistillationModule
from lightning_cil.methods.rehearsal import RehearsalModule
from lightning_cil.networks.backbones import BackboneSpec
from lightning_cil.precision import full_precision

__all__ = ["WA"]


class WA(RehearsalModule, DistillationModule):
    """WA: rehearsal + distillation, then the new classes' classifier weights are scaled to the old ones' norm.

    - Loss = (1 - lambda) CE over all seen classes + lambda KD(old logits, teacher, T), lambda = old / seen
      classes, on the new data plus a herding exemplar memory: the paper's weighting and that of PyCIL's wa.py
      (``kd_lambda``), with PyCIL's KD scale (no T^2, see :func:`kd_loss`). An earlier revision of PyCIL's wa.py
      used CE + 2 KD instead; this class follows the paper.
    - After each task from the second on: gamma = mean ||w_old|| / mean ||w_new|| over the classifier rows, and the
      new rows are multiplied by gamma, which removes the bias of the fully connected layer towards the new
      classes that the imbalanced training data causes. ``alignment`` records (old, new before, new after) norms.

    Deviation: the paper also clips the classifier weights to be non-negative during training; PyCIL's WA,
    whose protocol the configs follow, does not, and neither does this class.

    Args:
        memory_budget / memory_per_class / selection: the exemplar memory (2,000, herding).
        temperature: distillation temperature (2).
    """

    def __init__(
        self,
        backbone: BackboneSpec = "resnet32",
        in_channels: int = 3,
        schedule: TaskSchedule | None = None,
        first_task: TaskSchedule | None = None,
        pretrained: str | None = None,
        memory_budget: int | None = 2000,
        memory_per_class: int | None = None,
        selection: Selection = "herding",
        temperature: float = 2.0,
    ) -> None:
        super().__init__(
            backbone, in_channels, schedule, first_task, pretrained, memory_budget, memory_per_class, selection
        )
        self.alignment: list[tuple[float, float, float]] = []

    def training_loss(self, logits: Tensor, labels: Tensor, images: Tensor) -> Tensor:
        return self.weighted_distillation_loss(logits, labels, images, self.hparams.temperature)

    def on_task_end(self, task: TaskInfo) -> None:
        old = self.num_old_classes
        if old:
            self._align_weights(old)
        self.update_memory(task)

    @torch.no_grad()
    def _align_weights(self, old: int) -> None:
        with full_precision(self.head.weight.device.type):
            norms = self.head.weight.norm(dim=1)
            old_norm, new_norm = norms[:old].mean().item(), norms[old:].mean().item()
            self.head.weight[old:] *= old_norm / new_norm
            self.alignment.append((old_norm, new_norm, self.head.weight[old:].norm(dim=1).mean().item()))

    def architecture(self) -> dict[str, Any]:
        return {**super().architecture(), "alignment": self.alignment}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.alignment = [tuple(a) for a in checkpoint["lightning_cil"]["alignment"]]
