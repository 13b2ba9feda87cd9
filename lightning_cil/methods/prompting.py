"""The prompt family (L2P, DualPrompt, CODA-Prompt): a frozen pre-trained ViT, a linear head over all seen classes,
and prompts chosen per image from the [CLS] feature of a prompt-free pass (the query).

What they share lives here: the frozen ViT and its query, the train-time masking of the logits of classes outside
the current task (the papers' ``train_mask``: without it the head forgets the old classes), the fp32 loss, and the
protocol card. Each method builds its prompts in :meth:`PromptModule.prompt_features`. Inference costs two ViT
passes and needs no task id.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_cil.methods.base import IncrementalModule
from lightning_cil.methods.protocol import Protocol
from lightning_cil.methods.schedule import TaskSchedule
from lightning_cil.networks.backbones import BackboneSpec
from lightning_cil.networks.vit_prompts import check_promptable
from lightning_cil.networks.vit_tuning import vit_of

__all__ = ["PromptModule", "VIT_IN1K"]

#: CODA-Prompt's weights (timm 0.6.12's vit_base_patch16_224 = augreg_in21k_ft_in1k)
VIT_IN1K = "vit_base_patch16_224.augreg_in21k_ft_in1k"


class PromptModule(IncrementalModule):
    """Base of the prompt family; see the module docstring.

    Args:
        backbone / in_channels / pretrained: the pre-trained timm ViT (frozen).
        schedule / first_task: optimisation of each task (the optimizer is rebuilt at every task).
        mask_old_logits: during training, the logits of classes of earlier tasks are set to -inf (the papers'
            protocol; False only to measure what the mask does).
    """

    rehearsal_free = True
    #: the weights of the paper's numbers (recorded in the protocol card)
    paper_weights: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        backbone: BackboneSpec = f"timm:{VIT_IN1K}",
        in_channels: int = 3,
        schedule: TaskSchedule | None = None,
        first_task: TaskSchedule | None = None,
        pretrained: str | None = "hub",
        mask_old_logits: bool = True,
    ) -> None:
        super().__init__(backbone, in_channels, schedule, first_task, pretrained)
        vit_of(self.backbone, type(self).__name__)
        check_promptable(self.backbone, type(self).__name__)
        self.backbone.requires_grad_(False)

    def protocol(self) -> Protocol:
        return Protocol(
            rehearsal_free=True, old_logit_masking=self.hparams.mask_old_logits, paper_weights=self.paper_weights
        )

    @property
    def dim(self) -> int:
        return self.backbone.embed_dim

    # ------------------------------------------------------------------ features

    def query(self, images: Tensor) -> Tensor:
        """The frozen ViT's [CLS] feature without prompts: what selects (or weighs) the prompts."""
        with torch.no_grad():
            return self.backbone(images)

    def prompt_features(self, images: Tensor, query: Tensor) -> tuple[Tensor, Tensor | None]:
        """The prompted ViT's feature for the head, and the method's extra training loss (None if it has none)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        features, _ = self.prompt_features(x, self.query(x))
        return self.head(features)

    def evaluation_scores(self, images: Tensor) -> dict[str, Tensor]:
        """The head on the prompted features; the query (a frozen pass) is computed once per test image over the
        stream (``frozen_features``)."""
        features, _ = self.prompt_features(images, self.frozen_features("query", images, self.query))
        return {self.scorers[0]: self.head(features)}

    # ------------------------------------------------------------------ training

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels, tasks = batch
        features, extra = self.prompt_features(images, self.query(images))
        logits = self.restrict_to_tasks(self.head(features).float(), tasks)
        first_new = min(self.task_data.info.new_classes)
        if self.hparams.mask_old_logits and first_new > 0:
            logits = logits.index_fill(1, torch.arange(first_new, device=logits.device), float("-inf"))
        loss = F.cross_entropy(logits, labels)
        self.log("train/ce", loss, on_step=True, on_epoch=True, batch_size=len(labels))
        if extra is not None:
            loss = loss + extra.float()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(labels))
        return loss

    def trainable_parameter_names(self) -> list[str]:
        """What the optimizer trains in the current task (prompts, keys and the head; never the ViT)."""
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def architecture(self) -> dict[str, Any]:
        return {**super().architecture(), "prompt_dim": self.dim}
