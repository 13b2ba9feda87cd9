"""RanPAC (McDonnell et al., "RanPAC: Random Projections and Pre-trained Models for Continual Learning", NeurIPS
2023)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_cil.data.scenario import TaskInfo
from lightning_cil.methods.prototypes import VIT_IN21K, Adaptation, PrototypeModule, first_task_adaptation
from lightning_cil.methods.schedule import TaskSchedule
from lightning_cil.networks.backbones import BackboneSpec

__all__ = ["RanPAC", "RidgeClassifier", "select_ridge"]

#: RanPAC's candidate ridge parameters, 10^-8 ... 10^8
RIDGES = tuple(10.0**k for k in range(-8, 9))


def select_ridge(h: Tensor, targets: Tensor, ridges: tuple[float, ...] = RIDGES, train_share: float = 0.8) -> float:
    """The ridge parameter of lowest validation MSE: fit on the first ``train_share`` of the rows of ``h`` (already
    shuffled), predict the rest (RanPAC's ``optimise_ridge_parameter``, on the current task's features only)."""
    n = int(len(h) * train_share)
    fit, val = h[:n], h[n:]
    gram, cross = fit.T @ fit, fit.T @ targets[:n]
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    losses = [torch.mean((val @ torch.linalg.solve(gram + ridge * eye, cross) - targets[n:]) ** 2) for ridge in ridges]
    return ridges[int(torch.stack(losses).argmin())]


class RidgeClassifier(nn.Module):
    """RanPAC's classifier: a fixed random projection ``h = ReLU(f W)`` (``W`` of i.i.d. N(0, 1) entries, drawn from
    ``seed``), the Gram matrix ``G = sum h h^T`` and the cross term ``C = sum h y^T`` accumulated over every task
    (float64), and the ridge solution ``W_o = (G + lambda I)^-1 C``; scores are ``h W_o``.

    Everything is a buffer, allocated at the first :meth:`update` (a task end): empty during the first task's
    adaptation, so that DDP does not broadcast them at every step. The checkpoint holds G (``projection_dim``^2
    float64 values: 800 MB at the paper's 10,000)."""

    def __init__(self, in_features: int, projection_dim: int, seed: int = 0) -> None:
        super().__init__()
        self.in_features, self.projection_dim, self.seed = in_features, projection_dim, seed
        self.classes = 0
        self.register_buffer("projection", torch.zeros(0, projection_dim))
        self.register_buffer("gram", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("cross", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("weight", torch.zeros(0, 0))
        self.register_buffer("ridge", torch.zeros((), dtype=torch.float64))

    @property
    def out_features(self) -> int:
        return self.classes

    @property
    def allocated(self) -> bool:
        return len(self.projection) > 0

    def allocate(self) -> None:
        """Draw the projection (the same on every rank: its own generator) and zero the statistics."""
        device, m = self.ridge.device, self.projection_dim
        generator = torch.Generator().manual_seed(self.seed)
        self.projection = torch.randn(self.in_features, m, generator=generator).to(device)
        self.gram = torch.zeros(m, m, dtype=torch.float64, device=device)
        self.cross = torch.zeros(m, self.classes, dtype=torch.float64, device=device)
        self.weight = torch.zeros(m, self.classes, device=device)

    def expand(self, out_features: int) -> None:
        grow = out_features - self.classes
        if grow <= 0:
            return
        self.classes = out_features
        if self.allocated:
            self.cross = torch.cat([self.cross, self.cross.new_zeros(len(self.cross), grow)], dim=1)
            self.weight = torch.cat([self.weight, self.weight.new_zeros(len(self.weight), grow)], dim=1)

    def project(self, features: Tensor) -> Tensor:
        return torch.relu(features.float() @ self.projection)

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        """Take in one task's features: accumulate G and C, choose lambda on this task's features (a seeded shuffle,
        80/20), solve for the weights."""
        if not self.allocated:
            self.allocate()
        device = self.gram.device
        h = self.project(features.to(device)).double()
        targets = torch.nn.functional.one_hot(labels.to(device), self.classes).double()
        self.gram += h.T @ h
        self.cross += h.T @ targets
        order = torch.randperm(len(h), generator=generator).to(device)
        self.ridge.fill_(select_ridge(h[order], targets[order]))
        self.weight = self.solve().to(self.weight.dtype)

    def solve(self) -> Tensor:
        eye = torch.eye(len(self.gram), dtype=self.gram.dtype, device=self.gram.device)
        return torch.linalg.solve(self.gram + self.ridge * eye, self.cross)

    def forward(self, features: Tensor) -> Tensor:
        if not self.allocated:  # before the first task end (validation during the first fit): no classifier yet
            return features.new_zeros(len(features), self.classes)
        return self.project(features) @ self.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, projection_dim={self.projection_dim}, out_features={self.classes}"


class RanPAC(PrototypeModule):
    """First-task adaptation, then a fixed random projection of the frozen features with a ReLU, and a ridge
    classifier solved in closed form on the Gram matrix accumulated over all tasks (no class forgets: every task
    only adds to G and C, and the solution is the one of all tasks' features at once).

    - Phase 1 (first task): a PET module trained as in APER (cosine head, CE, SGD momentum 0.9, cosine schedule;
      CIFAR: adapter, 20 epochs, lr 0.01, batch 48, wd 5e-4). ``adaptation: null`` is the paper's "no Phase 1"
      ablation.
    - Phase 2 (every task end): ``h = ReLU(W^T f(x))`` with ``W`` of size ``d x projection_dim`` (10,000), G and C
      accumulate the new classes' training images (test transform), lambda in 10^-8...10^8 is chosen by MSE on the
      current task's features (80/20 split of a seeded shuffle), and ``W_o = (G + lambda I)^-1 C`` (float64, on the
      training device). Scores are ``h W_o`` (the official plain linear head; PILOT's L2-normalised rows are a
      deviation we do not copy).

    Deviation: the 80/20 shuffle is seeded (by ``projection_seed`` and the task) so that a run is reproducible;
    the official code shuffles with the loader's global RNG.

    Args:
        backbone / in_channels / pretrained / first_task / schedule / adaptation / bottleneck / prompt_tokens: as
            for APER.
        projection_dim: the random projection's size M (10,000).
        projection_seed: seed of the random projection (identical on every rank) and of the lambda split.
    """

    scorers = ("ridge",)
    #: IN21K for CIFAR, IN1K (``augreg_in21k_ft_in1k``) for ImageNet-R/-A and CUB
    paper_weights = (VIT_IN21K, "vit_base_patch16_224.augreg_in21k_ft_in1k")

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
        projection_dim: int = 10000,
        projection_seed: int = 0,
    ) -> None:
        if adaptation is not None and first_task is None:
            first_task = first_task_adaptation()
        super().__init__(backbone, in_channels, schedule, first_task, pretrained, adaptation, bottleneck, prompt_tokens)
        if projection_dim < 1:
            raise ValueError(f"projection_dim={projection_dim} must be positive (RanPAC: 10000).")
        self.head = RidgeClassifier(self.feature_dim(), projection_dim, projection_seed)

    def update_classifier(self, task: TaskInfo, features: Tensor, labels: Tensor) -> None:
        generator = torch.Generator().manual_seed(self.hparams.projection_seed * 1000 + task.index)
        self.head.update(features, labels, generator)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if len(checkpoint["state_dict"].get("head.projection", ())):
            self.head.allocate()
