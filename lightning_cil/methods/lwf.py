"""LwF: learning without forgetting (Li and Hoiem, ECCV 2016 / TPAMI 2017), in its class-incremental form."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_cil.methods.base import TaskSchedule
from lightning_cil.methods.distillation import DistillationModule, kd_loss
from lightning_cil.networks.backbones import BackboneSpec

__all__ = ["LwF"]


class LwF(DistillationModule):
    """LwF: no memory; the previous model's outputs on the new data are the targets for the old classes.

    Loss = CE over the new classes' logits (labels shifted to them) + ``kd_weight`` * KD(old logits, teacher, T),
    as in PyCIL's class-incremental LwF (lambda 3, T = 2). The CE is restricted to the new classes so that it
    does not push the old classes' logits down on data that holds none of them; the KD term keeps them.

    Args:
        backbone / in_channels / schedule / first_task / pretrained: as for every method.
        temperature: distillation temperature (2).
        kd_weight: weight of the distillation term (3).
    """

    def __init__(
        self,
        backbone: BackboneSpec = "resnet32",
        in_channels: int = 3,
        schedule: TaskSchedule | None = None,
        first_task: TaskSchedule | None = None,
        pretrained: str | None = None,
        temperature: float = 2.0,
        kd_weight: float = 3.0,
    ) -> None:
        super().__init__(backbone, in_channels, schedule, first_task, pretrained)
        if temperature <= 0 or kd_weight < 0:
            raise ValueError(f"temperature={temperature} must be positive and kd_weight={kd_weight} >= 0.")

    def training_loss(self, logits: Tensor, labels: Tensor, images: Tensor) -> Tensor:
        old = self.num_old_classes
        if not old:
            return F.cross_entropy(logits, labels)
        loss = F.cross_entropy(logits[:, old:], labels - old)
        return loss + self.hparams.kd_weight * kd_loss(
            logits[:, :old], self.teacher_logits(images), self.hparams.temperature
        )
