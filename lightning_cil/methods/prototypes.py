"""The prototype family of pre-trained-model methods (SimpleCIL, APER, RanPAC): a pre-trained backbone, adapted in
the first task at most and frozen afterwards, and a classifier built in closed form from class statistics.

What they share lives here: the optional first-task adaptation (a PET module of ``networks/vit_tuning.py`` trained
through a temporary cosine head over the first task's classes), the freezing after it, and the task end that
extracts the new classes' features once (test transform, sharded over the ranks and gathered; the ViT forward under
the Trainer's precision, bf16 under ``bf16-mixed``, the features in fp32) and hands them to the method's classifier.
Every rank receives the same gathered features, so the statistics built from them (class means, Gram matrices) are
identical on every rank and equal to those of a 1-process run.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_cil.data.scenario import TaskInfo
from lightning_cil.methods.base import CHECKPOINT_KEY, IncrementalModule
from lightning_cil.methods.protocol import Protocol
from lightning_cil.methods.schedule import TaskSchedule
from lightning_cil.networks.backbones import BackboneSpec
from lightning_cil.networks.heads import CosineLinear, CosinePrototypes
from lightning_cil.networks.vit_tuning import PET_KINDS, add_pet, pet_disabled

__all__ = ["Adaptation", "PrototypeModule", "VIT_IN21K", "first_task_adaptation"]

#: the weights of SimpleCIL's, APER's and EASE's CIFAR numbers (timm 0.6.12's vit_base_patch16_224_in21k)
VIT_IN21K = "vit_base_patch16_224.augreg_in21k"


def first_task_adaptation() -> TaskSchedule:
    """The first-task adaptation recipe APER and RanPAC share (their CIFAR adapter configs): 20 epochs, SGD lr
    0.01, momentum 0.9, wd 5e-4, cosine schedule."""
    return TaskSchedule(epochs=20, lr=0.01, momentum=0.9, weight_decay=5e-4, scheduler="cosine")


#: what the first task adapts: a PET module of ``vit_tuning``, the whole backbone (``finetune``), or nothing
Adaptation = Literal["adapter", "ssf", "vpt_shallow", "vpt_deep", "finetune"] | None


class PrototypeModule(IncrementalModule):
    """Base of the prototype family; see the module docstring. Subclasses set :meth:`features` (what the
    classifier reads) and :meth:`update_classifier` (how it takes in a task's features).

    Args:
        backbone / in_channels / pretrained: the pre-trained network (a timm ViT for the PET adaptations).
        schedule: optimisation of the tasks after the first: ``epochs: 0`` (nothing is trained after the first task).
        first_task: optimisation of the first task's adaptation; ``epochs: 0`` without one.
        adaptation: the first task's adaptation (None: the backbone stays as pre-trained).
        bottleneck: adapter width (AdaptFormer's ``ffn_num``: 64).
        prompt_tokens: VPT tokens per prompted layer (5).
    """

    scorers: ClassVar[tuple[str, ...]] = ("prototype",)
    rehearsal_free = True
    mixed_precision_features = True
    #: every task trains (EASE: one adapter per task); the others adapt in the first task at most
    adapts_every_task: ClassVar[bool] = False
    #: the weights of the paper's numbers (recorded in the protocol card)
    paper_weights: ClassVar[tuple[str, ...]] = (VIT_IN21K,)

    def __init__(
        self,
        backbone: BackboneSpec = f"timm:{VIT_IN21K}",
        in_channels: int = 3,
        schedule: TaskSchedule | None = None,
        first_task: TaskSchedule | None = None,
        pretrained: str | None = "hub",
        adaptation: Adaptation = None,
        bottleneck: int = 64,
        prompt_tokens: int = 5,
    ) -> None:
        resolved_schedule = schedule or TaskSchedule(epochs=0)
        resolved_first = first_task or (TaskSchedule(epochs=0) if adaptation is None else None)
        super().__init__(backbone, in_channels, resolved_schedule, resolved_first, pretrained)
        # the checkpoint records the schedules that ran (a resume compares them with the configured ones)
        self.hparams["schedule"], self.hparams["first_task"] = self.schedule, self.first_task_schedule
        name = type(self).__name__
        if self.schedule.epochs and not self.adapts_every_task:
            raise ValueError(
                f"{name} trains nothing after the first task: schedule.epochs={self.schedule.epochs} must be 0 "
                f"(the first task's adaptation is first_task)."
            )
        if adaptation is None and self.schedule_for_task(0).epochs:
            raise ValueError(
                f"{name} with adaptation=None trains nothing: first_task.epochs="
                f"{self.schedule_for_task(0).epochs} must be 0 (or choose an adaptation, e.g. adapter)."
            )
        if adaptation is not None and not self.schedule_for_task(0).epochs:
            raise ValueError(f"{name}: adaptation={adaptation!r} needs first_task.epochs of at least 1.")
        if adaptation not in (None, "finetune", *PET_KINDS):
            raise ValueError(f"adaptation={adaptation!r} is unknown; choose one of {[*PET_KINDS, 'finetune']} or null.")
        self.backbone.requires_grad_(False)
        #: the pre-trained network next to a fine-tuned one (``finetune`` only; a PET is switched off instead)
        self.pretrained_backbone: nn.Module | None = None
        if adaptation == "finetune":
            self.pretrained_backbone = copy.deepcopy(self.backbone)
            self.backbone.requires_grad_(True)
        elif adaptation is not None:
            for parameter in add_pet(self.backbone, adaptation, bottleneck, prompt_tokens, method=name):
                parameter.requires_grad_(True)
        self.head = CosinePrototypes(self.feature_dim())
        #: the temporary cosine head of the first task's adaptation (None outside it)
        self.adaptation_head: CosineLinear | None = None

    def protocol(self) -> Protocol:
        return Protocol(rehearsal_free=True, paper_weights=self.paper_weights)

    # ------------------------------------------------------------------ features

    def feature_dim(self) -> int:
        """Size of :meth:`features`."""
        return self.backbone.out_dim

    def features(self, images: Tensor) -> Tensor:
        """What the classifier reads: the (adapted) backbone's features."""
        return self.backbone(images)

    def pretrained_features(self, images: Tensor) -> Tensor:
        """The features of the backbone as pre-trained (its PET switched off, or the kept copy)."""
        if self.pretrained_backbone is not None:
            return self.pretrained_backbone(images)
        with pet_disabled(self.backbone):
            return self.backbone(images)

    # ------------------------------------------------------------------ task hooks

    def on_task_start(self, task: TaskInfo) -> None:
        super().on_task_start(task)
        if self.schedule_for_task(task.index).epochs:  # an adaptation: the features are about to change
            self.feature_cache.forget("features")
            self.adaptation_head = CosineLinear(self.backbone.out_dim, len(task.new_classes)).to(self.device)

    def on_task_end(self, task: TaskInfo) -> None:
        if self.adaptation_head is not None:  # the adaptation is over: everything stays as it is now
            self.adaptation_head = None
            self.requires_grad_(False)
        data = self.task_data
        indices = torch.cat([data.members(label) for label in task.new_classes])
        features = self.extract_features(data.subset(indices), network=self.features, dim=self.feature_dim())
        self.update_classifier(task, features, data.labels[indices])

    def update_classifier(self, task: TaskInfo, features: Tensor, labels: Tensor) -> None:
        """Take in the new classes' ``features`` (fp32, CPU, the same on every rank): their prototypes."""
        self.head.set_class_means(features, labels)

    # ------------------------------------------------------------------ training and scoring

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        """The first task's adaptation: cross-entropy through the cosine head over the task's own classes."""
        images, labels, _ = batch
        if self.adaptation_head is None:
            raise RuntimeError(f"{type(self).__name__} trains only in its first task's adaptation.")
        logits = self.adaptation_head(self.backbone(images)).float()
        loss = F.cross_entropy(logits, labels - min(self.task_data.info.new_classes))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(labels))
        return loss

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def evaluation_scores(self, images: Tensor) -> dict[str, Tensor]:
        """The classifier on the features; once the network is frozen (outside the first task's adaptation) they
        are computed once per test image over the stream (``frozen_features``)."""
        if self.adaptation_head is None:
            features = self.frozen_features("features", images, self.features)
        else:
            features = self.features(images)
        return {self.scorers[0]: self.head(features)}

    # ------------------------------------------------------------------ checkpoints

    def architecture(self) -> dict[str, Any]:
        head = self.adaptation_head
        return {**super().architecture(), "adaptation_head": None if head is None else head.out_features}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        classes = checkpoint[CHECKPOINT_KEY].get("adaptation_head")
        self.adaptation_head = None if classes is None else CosineLinear(self.backbone.out_dim, classes)
        if classes is None and self.task_index >= 0:
            self.requires_grad_(False)

    def num_parameters(self) -> int:
        extra = self.pretrained_backbone
        return super().num_parameters() + (sum(p.numel() for p in extra.parameters()) if extra is not None else 0)
