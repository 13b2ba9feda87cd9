"""EASE (Zhou et al., "Expandable Subspace Ensemble for Pre-Trained Model-Based Class-Incremental Learning", CVPR
2024)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_cil.data.scenario import TaskInfo
from lightning_cil.methods.base import CHECKPOINT_KEY
from lightning_cil.methods.prototypes import VIT_IN21K, PrototypeModule
from lightning_cil.methods.schedule import TaskSchedule
from lightning_cil.networks.backbones import BackboneSpec
from lightning_cil.networks.vit_tuning import adapter_set, add_adapter_set, num_adapter_sets

__all__ = ["EASE", "SubspacePrototypes"]


class SubspacePrototypes(nn.Module):
    """EASE's classifier: a prototype of every class in every subspace (one per adapter set), and the ensemble of
    cosine scores over the subspaces.

    A class of task i has real prototypes (means of its training features) in the subspaces 0..i, which existed when
    its data was there; in a later subspace j its prototype is synthesised from the classes that have a real one
    there (the tasks >= j), weighted by the softmax of their cosine similarity to it in its own subspace i. The
    scores of a class of task i are ``cos(f_i, p_i) + alpha / t * sum_{j != i} cos(f_j, p_j)`` (t: the current task,
    0-based)."""

    def __init__(self, dim: int, alpha: float) -> None:
        super().__init__()
        self.dim, self.alpha = dim, alpha
        self.register_buffer("prototypes", torch.zeros(1, 0, dim))  # [subspaces, classes, dim]
        self.register_buffer("class_task", torch.zeros(0, dtype=torch.long))

    @property
    def out_features(self) -> int:
        return self.prototypes.shape[1]

    @property
    def subspaces(self) -> int:
        return self.prototypes.shape[0]

    def resize(self, subspaces: int, classes: int) -> None:
        grown = self.prototypes.new_zeros(subspaces, classes, self.dim)
        grown[: self.subspaces, : self.out_features] = self.prototypes
        tasks = self.class_task.new_zeros(classes)
        tasks[: len(self.class_task)] = self.class_task
        self.prototypes, self.class_task = grown, tasks

    def expand(self, out_features: int) -> None:
        if out_features > self.out_features:
            self.resize(self.subspaces, out_features)

    def update(self, task: int, features: Tensor, labels: Tensor) -> None:
        """The new classes' real prototypes in every subspace (``features``: ``[n, subspaces * dim]``), then every
        synthesised prototype of the older classes again."""
        labels = labels.to(self.prototypes.device)
        features = features.to(self.prototypes.device).view(len(features), self.subspaces, self.dim)
        for label in labels.unique().tolist():
            self.prototypes[:, label] = features[labels == label].double().mean(0).to(self.prototypes.dtype)
            self.class_task[label] = task
        seen = self.class_task[: self.out_features]
        for j in range(1, self.subspaces):
            real = torch.nonzero(seen >= j).flatten()  # classes whose data met adapter j
            for old_task in range(j):
                old = torch.nonzero(seen == old_task).flatten()
                similarity = (
                    F.normalize(self.prototypes[old_task, old], dim=1)
                    @ F.normalize(self.prototypes[old_task, real], dim=1).T
                )
                self.prototypes[j, old] = similarity.softmax(dim=1) @ self.prototypes[j, real]

    def forward(self, features: Tensor, task: int) -> Tensor:
        """Scores of every class from ``features`` of every subspace (``[batch, subspaces * dim]``)."""
        f = F.normalize(features.float().view(len(features), self.subspaces, self.dim), dim=2)
        cosines = torch.einsum("bsd,scd->bsc", f, F.normalize(self.prototypes.float(), dim=2))  # [B, S, C]
        own = F.one_hot(self.class_task, self.subspaces).T.to(cosines.dtype)  # [S, C]: the class's own subspace
        own_scores = (cosines * own).sum(dim=1)
        if task == 0:
            return own_scores
        return own_scores + self.alpha / task * (cosines * (1 - own)).sum(dim=1)


class EASE(PrototypeModule):
    """One AdaptFormer adapter set per task on a frozen ViT, each trained on its task alone; classification by an
    ensemble of cosine prototypes over all adapters' feature subspaces (``SubspacePrototypes``).

    - Task t adds an adapter set (bottleneck 64, every block), trained with cross-entropy through a temporary cosine
      head over the task's own classes (local labels); the ViT and the earlier adapters are frozen. SGD, cosine
      schedule, 20 epochs per task (CIFAR: lr 0.025, batch 48, wd 5e-4).
    - At the task end the new classes get prototypes in every subspace 0..t (their training images under the test
      transform through each adapter set), and the older classes' prototypes in the subspaces after their own are
      synthesised again (see ``SubspacePrototypes``). A test image costs t + 1 ViT passes (the finished adapters'
      are computed once per image over the stream).

    Args:
        backbone / in_channels / pretrained: the pre-trained timm ViT.
        schedule: every task's optimisation (first_task: the first's, if it differs).
        bottleneck: adapter width (64).
        alpha: weight of the other subspaces in a class's score (0.1).
    """

    adapts_every_task = True

    def __init__(
        self,
        backbone: BackboneSpec = f"timm:{VIT_IN21K}",
        in_channels: int = 3,
        schedule: TaskSchedule | None = None,
        first_task: TaskSchedule | None = None,
        pretrained: str | None = "hub",
        bottleneck: int = 64,
        alpha: float = 0.1,
    ) -> None:
        schedule = schedule or TaskSchedule(epochs=20, lr=0.025, momentum=0.9, weight_decay=5e-4, scheduler="cosine")
        super().__init__(backbone, in_channels, schedule, first_task, pretrained, "adapter", bottleneck)
        if not schedule.epochs or not self.schedule_for_task(0).epochs:
            raise ValueError("EASE trains an adapter in every task: every task needs at least 1 epoch.")
        self.head = SubspacePrototypes(self.backbone.out_dim, alpha)

    def feature_dim(self) -> int:
        return num_adapter_sets(self.backbone) * self.backbone.out_dim

    def subspace_features(self, images: Tensor, index: int) -> Tensor:
        with adapter_set(self.backbone, index):
            return self.backbone(images)

    def features(self, images: Tensor) -> Tensor:
        return torch.cat([self.subspace_features(images, j) for j in range(num_adapter_sets(self.backbone))], dim=1)

    def on_task_start(self, task: TaskInfo) -> None:
        if task.index > 0:
            self.requires_grad_(False)
            for parameter in add_adapter_set(self.backbone):
                parameter.requires_grad_(True)
        self.head.resize(num_adapter_sets(self.backbone), self.head.out_features)
        super().on_task_start(task)

    def update_classifier(self, task: TaskInfo, features: Tensor, labels: Tensor) -> None:
        self.head.update(task.index, features, labels)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x), max(self.task_index, 0))

    def evaluation_scores(self, images: Tensor) -> dict[str, Tensor]:
        """The ensemble over the subspaces; a finished adapter set's features of a test image are computed once."""
        newest = num_adapter_sets(self.backbone) - 1
        parts = []
        for j in range(newest + 1):
            compute = lambda x, j=j: self.subspace_features(x, j)  # noqa: E731
            training = self.adaptation_head is not None and j == newest
            parts.append(compute(images) if training else self.frozen_features(f"subspace{j}", images, compute))
        return {self.scorers[0]: self.head(torch.cat(parts, dim=1), max(self.task_index, 0))}

    def architecture(self) -> dict[str, Any]:
        return {**super().architecture(), "adapter_sets": num_adapter_sets(self.backbone)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        while num_adapter_sets(self.backbone) < checkpoint[CHECKPOINT_KEY]["adapter_sets"]:
            add_adapter_set(self.backbone)
        self.head.resize(num_adapter_sets(self.backbone), checkpoint[CHECKPOINT_KEY]["head_classes"])
        super().on_load_checkpoint(checkpoint)
        if self.adaptation_head is not None:  # resumed inside a task: only its adapter set and head train
            self.requires_grad_(False)
            for block in self.backbone.blocks:
                block.adapters[-1].requires_grad_(True)
            self.adaptation_head.requires_grad_(True)
