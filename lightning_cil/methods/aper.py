"""APER, formerly ADAM (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models", IJCV 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_cil.methods.prototypes import VIT_IN21K, Adaptation, PrototypeModule, first_task_adaptation
from lightning_cil.methods.schedule import TaskSchedule
from lightning_cil.networks.backbones import BackboneSpec

__all__ = ["APER"]


class APER(PrototypeModule):
    """Adapt the pre-trained model on the first task only, then classify by cosine prototypes on the concatenated
    features of the pre-trained and the adapted model, ``g(x) = [f_PTM(x); f_adapted(x)]``.

    - First task: one PET module (``adaptation``: AdaptFormer ``adapter``, ``ssf``, ``vpt_shallow``, ``vpt_deep``,
      or ``finetune`` of all weights) trained with cross-entropy through a cosine head (learnable scale, initialised
      to 1) over the first task's classes: SGD momentum 0.9, cosine schedule to 0 (the paper's adapter recipe on
      CIFAR: 20 epochs, lr 0.01, batch 48, wd 5e-4).
    - Then both models are frozen; every task (the first included) appends its classes' prototypes of ``g``.
      Later tasks have 0 epochs. A test image costs two ViT passes (one with the PET switched off).

    Deviation: the pre-trained features come from the same ViT with its PET switched off (bitwise the pre-trained
    network), not from a second copy; ``finetune`` keeps the copy. Input: the backbone's data config (see SimpleCIL).

    Args:
        backbone / in_channels / pretrained: the pre-trained network (a timm ViT for the PET variants).
        first_task: the adaptation's optimisation (default: the paper's adapter recipe above).
        schedule: later tasks: ``epochs: 0``.
        adaptation: the PET variant (``adapter`` by default).
        bottleneck: adapter width (64).
        prompt_tokens: VPT tokens (5).
    """

    def __init__(
        self,
        backbone: BackboneSpec = f"timm:{VIT_IN21K}",
        in_channels: int = 3,
        schedule: TaskSchedule | None = None,
        first_task: TaskSchedule | None = None,
        pretrained: str | None = "hub",
        adaptation: Adaptation = "adapter",
        bottleneck: int = 64,
        prompt_tokens: int = 5,
    ) -> None:
        if adaptation is None:
            raise ValueError(
                "APER adapts the first task: adaptation=None is SimpleCIL (lightning_cil.methods.SimpleCIL)."
            )
        first_task = first_task or first_task_adaptation()
        super().__init__(backbone, in_channels, schedule, first_task, pretrained, adaptation, bottleneck, prompt_tokens)

    def feature_dim(self) -> int:
        return 2 * self.backbone.out_dim

    def features(self, images: Tensor) -> Tensor:
        return torch.cat([self.pretrained_features(images), self.backbone(images)], dim=1)
