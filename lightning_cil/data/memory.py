"""The exemplar memory of rehearsal methods: which training samples of old classes are kept.

The memory holds train-split *indices* per class, in priority order (the order of selection), not
image copies: it is small in a checkpoint and the data module re-reads the images. Selection works on
features the method computes (iCaRL: L2-normalised backbone features; DER: the super-feature).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_cil.precision import full_precision

__all__ = ["ExemplarMemory", "Selection", "closest_to_mean", "herding", "select"]

Selection = Literal["herding", "random", "closest"]


def herding(features: Tensor, m: int) -> Tensor:
    """iCaRL's herding: pick, one at a time, the sample that brings the mean of the picked set closest to
    the mean of all samples. Returns the picked rows in picking order (the memory's priority).

    Vectorised over the candidates: each of the ``m`` steps is one ``[n, d] x [d]`` product, in fp32 even
    under autocast (a bf16 product changes the picks).
    """
    with full_precision(features.device.type):
        return _herding(features, m)


def _herding(features: Tensor, m: int) -> Tensor:
    n = features.shape[0]
    m = min(m, n)
    feats = F.normalize(features.float(), dim=1)
    target = feats.mean(dim=0)
    chosen = torch.empty(m, dtype=torch.long, device=feats.device)
    running = torch.zeros_like(target)
    available = torch.ones(n, dtype=torch.bool, device=feats.device)
    for k in range(m):
        # Adding f_i gives the mean (running + f_i) / (k + 1); its distance to the target is
        # |a - f_i|^2 / (k + 1)^2 with a = (k + 1) * target - running. Features have unit norm, so
        # |a - f_i|^2 = |a|^2 - 2 a.f_i + 1 and the nearest mean is the largest a.f_i: one mat-vec per step.
        score = feats @ ((k + 1) * target - running)
        pick = int(torch.argmax(score.masked_fill(~available, float("-inf"))))
        chosen[k] = pick
        available[pick] = False
        running += feats[pick]
    return chosen.cpu()


def closest_to_mean(features: Tensor, m: int) -> Tensor:
    """The ``m`` samples nearest to the class mean (of L2-normalised features), nearest first."""
    with full_precision(features.device.type):
        feats = F.normalize(features.float(), dim=1)
        distance = ((feats - feats.mean(dim=0)) ** 2).sum(dim=1)
    return torch.argsort(distance, stable=True)[: min(m, len(feats))].cpu()


def select(strategy: Selection, features: Tensor, m: int, generator: torch.Generator) -> Tensor:
    """Rows of ``features`` to keep, in priority order."""
    if strategy == "herding":
        return herding(features, m)
    if strategy == "closest":
        return closest_to_mean(features, m)
    if strategy == "random":
        return torch.randperm(features.shape[0], generator=generator)[: min(m, features.shape[0])]
    raise ValueError(f"selection={strategy!r} is unknown; choose 'herding', 'random' or 'closest'.")


class ExemplarMemory:
    """Per-class exemplars under a budget: a fixed total ``budget`` (K / seen classes each, the remainder
    spread over the lowest labels) or a fixed ``per_class`` count.

    Args:
        budget: total number of exemplars (2,000 for CIFAR-100 in iCaRL, PyCIL and DER).
        per_class: exemplars per class instead of a total (e.g. 20); the memory then grows with classes.
        selection: ``herding`` (iCaRL), ``random`` or ``closest`` (nearest to the class mean).
        seed: seed of random selection.
    """

    def __init__(
        self, budget: int | None = 2000, per_class: int | None = None, selection: Selection = "herding", seed: int = 0
    ) -> None:
        if (budget is None) == (per_class is None):
            raise ValueError(
                f"set exactly one of memory budget ({budget}) and memory per_class ({per_class}); "
                f"e.g. budget=2000 (fixed total) or per_class=20 (grows with classes)."
            )
        for name, value in (("budget", budget), ("per_class", per_class)):
            if value is not None and value < 1:
                raise ValueError(f"memory {name}={value} must be at least 1.")
        if selection not in ("herding", "random", "closest"):
            raise ValueError(f"selection={selection!r} is unknown; choose 'herding', 'random' or 'closest'.")
        self.budget, self.per_class, self.selection, self.seed = budget, per_class, selection, seed
        self.exemplars: dict[int, Tensor] = {}

    def check_capacity(self, num_classes: int) -> None:
        """Refuse a total budget below the stream's number of classes: once that many classes are seen, some
        would keep no exemplar at all and be forgotten without a word."""
        if self.budget is not None and self.budget < num_classes:
            raise ValueError(
                f"memory_budget={self.budget} is below the {num_classes} classes of this stream: "
                f"{num_classes - self.budget} of them would keep no exemplar. Set memory_budget to at least "
                f"{num_classes} (e.g. {20 * num_classes} for 20 per class), or set memory_per_class instead."
            )

    def quota(self, labels: Iterable[int]) -> dict[int, int]:
        """Exemplars each class may keep when ``labels`` are the classes in memory."""
        labels = sorted(labels)
        if self.per_class is not None:
            return {label: self.per_class for label in labels}
        assert self.budget is not None
        if not labels:
            return {}
        base, extra = divmod(self.budget, len(labels))
        return {label: base + (1 if i < extra else 0) for i, label in enumerate(labels)}

    def reduce(self, labels: Iterable[int]) -> None:
        """Shrink every stored class to its quota when ``labels`` will be in memory (keeps the first)."""
        quota = self.quota(labels)
        for label in list(self.exemplars):
            self.exemplars[label] = self.exemplars[label][: quota.get(label, 0)]

    def add(self, label: int, indices: Tensor, features: Tensor, m: int) -> None:
        """Select ``m`` exemplars of ``label`` among candidates (train-split ``indices`` with ``features``)."""
        if len(indices) != len(features):
            raise ValueError(f"{len(indices)} candidate indices but {len(features)} feature rows for class {label}.")
        generator = torch.Generator().manual_seed(self.seed * 100_003 + int(label))
        rows = select(self.selection, features, m, generator)
        self.exemplars[int(label)] = indices.cpu()[rows].clone()

    def update(self, labels_seen: Iterable[int], new: dict[int, tuple[Tensor, Tensor]]) -> None:
        """One task end: reduce old classes, then select for each new class from ``{label: (indices, features)}``."""
        labels_seen = sorted(set(labels_seen))
        self.reduce(labels_seen)
        quota = self.quota(labels_seen)
        for label, (indices, features) in sorted(new.items()):
            self.add(label, indices, features, quota[label])

    def indices(self) -> Tensor:
        """All exemplars (train-split indices), ordered by class then priority."""
        if not self.exemplars:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([self.exemplars[label] for label in sorted(self.exemplars)])

    def labels(self) -> list[int]:
        return sorted(self.exemplars)

    def __len__(self) -> int:
        return sum(len(v) for v in self.exemplars.values())

    def state_dict(self) -> dict:
        return {
            "budget": self.budget,
            "per_class": self.per_class,
            "selection": self.selection,
            "exemplars": {int(k): v.tolist() for k, v in self.exemplars.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.exemplars = {int(k): torch.tensor(v, dtype=torch.long) for k, v in state["exemplars"].items()}
