"""Classifier heads that grow with the stream."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CosineLinear", "CosinePrototypes", "IncrementalLinear", "TaskHeads"]


class IncrementalLinear(nn.Module):
    """A linear classifier whose outputs grow as classes arrive; old rows are kept as they are.

    Growth replaces the parameter, so it must happen between fits (a new DDP wrap and optimizer
    follow). A fresh head has zero outputs.
    """

    def __init__(self, in_features: int, out_features: int = 0) -> None:
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self._init_rows(0)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def _init_rows(self, start: int) -> None:
        with torch.no_grad():
            if self.out_features > start:
                bound = self.in_features**-0.5  # nn.Linear's default uniform range
                self.weight[start:].uniform_(-bound, bound)
                self.bias[start:].uniform_(-bound, bound)

    def expand(self, out_features: int) -> None:
        """Grow to ``out_features`` outputs (no-op if already that large)."""
        old = self.out_features
        if out_features <= old:
            return
        weight = torch.empty(out_features, self.in_features, device=self.weight.device, dtype=self.weight.dtype)
        bias = torch.zeros(out_features, device=self.bias.device, dtype=self.bias.dtype)
        weight[:old], bias[:old] = self.weight.detach(), self.bias.detach()
        self.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        self.bias = nn.Parameter(bias, requires_grad=self.bias.requires_grad)
        self._init_rows(old)

    def expand_inputs(self, in_features: int) -> None:
        """Accept a longer feature vector: old weights keep their columns, the new columns get the default
        random initialisation (as DER's official code does when the super-feature grows)."""
        if in_features <= self.in_features:
            return
        weight = torch.empty(self.out_features, in_features, device=self.weight.device, dtype=self.weight.dtype)
        weight.uniform_(-(in_features**-0.5), in_features**-0.5)
        weight[:, : self.in_features] = self.weight.detach()
        self.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        self.in_features = in_features

    def keep_inputs(self, index: Tensor) -> None:
        """Keep only the feature columns ``index`` (after the features they read were pruned away)."""
        index = index.to(self.weight.device)
        self.weight = nn.Parameter(self.weight.detach()[:, index].clone(), requires_grad=self.weight.requires_grad)
        self.in_features = len(index)

    def forward(self, features: Tensor) -> Tensor:
        return nn.functional.linear(features, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class TaskHeads(nn.Module):
    """One linear classifier per task, concatenated; finished tasks' heads are frozen (task-incremental methods
    that promise to leave earlier tasks exactly as they were). Same interface as :class:`IncrementalLinear`."""

    def __init__(self, in_features: int, out_features: int = 0) -> None:
        super().__init__()
        self.in_features = in_features
        self.heads = nn.ModuleList()
        self.expand(out_features)

    @property
    def out_features(self) -> int:
        return sum(h.out_features for h in self.heads)

    def expand(self, out_features: int) -> None:
        """Freeze the existing heads and add one for the classes beyond them."""
        if out_features <= self.out_features:
            return
        for head in self.heads:
            head.requires_grad_(False)
        device = self.heads[0].weight.device if len(self.heads) else None
        self.heads.append(nn.Linear(self.in_features, out_features - self.out_features, device=device))

    def forward(self, features: Tensor) -> Tensor:
        if not len(self.heads):
            return features.new_zeros(len(features), 0)
        return torch.cat([head(features) for head in self.heads], dim=1)


class CosineLinear(nn.Module):
    """``sigma * cos(features, w_c)`` for every class c, with a learnable scale ``sigma`` (initialised to 1): the
    trained head of APER's and RanPAC's first-task adaptation (a ``CosineLinear`` in their code)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.uniform_(self.weight, -(in_features**-0.5), in_features**-0.5)
        self.sigma = nn.Parameter(torch.ones(()))

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: Tensor) -> Tensor:
        return self.sigma * F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))


class CosinePrototypes(nn.Module):
    """A classifier of class prototypes, not trained: class c scores ``cos(features, p_c)``, with ``p_c`` the mean
    feature of its training images (SimpleCIL, APER). Prototypes are buffers (saved with the weights); a class
    without one yet scores 0. Same growing interface as :class:`IncrementalLinear`."""

    def __init__(self, in_features: int, out_features: int = 0) -> None:
        super().__init__()
        self.in_features = in_features
        self.register_buffer("prototypes", torch.zeros(out_features, in_features))

    @property
    def out_features(self) -> int:
        return self.prototypes.shape[0]

    def expand(self, out_features: int) -> None:
        if out_features > self.out_features:
            grown = self.prototypes.new_zeros(out_features, self.in_features)
            grown[: self.out_features] = self.prototypes
            self.prototypes = grown

    def set_class_means(self, features: Tensor, labels: Tensor) -> None:
        """The prototypes of the classes in ``labels``: the mean of their rows of ``features`` (sums in float64, so
        that the mean does not depend on the order of the rows beyond float64 rounding)."""
        classes = labels.unique()
        self.expand(int(classes.max()) + 1)
        sums = torch.zeros(self.out_features, self.in_features, dtype=torch.float64)
        sums.index_add_(0, labels.cpu(), features.cpu().double())
        counts = torch.bincount(labels.cpu(), minlength=self.out_features).clamp(min=1)
        means = (sums / counts[:, None]).to(self.prototypes.dtype).to(self.prototypes.device)
        self.prototypes[classes.to(self.prototypes.device)] = means[classes.to(self.prototypes.device)]

    def forward(self, features: Tensor) -> Tensor:
        prototypes = F.normalize(self.prototypes.float(), dim=1)
        return F.linear(F.normalize(features.float(), dim=1), prototypes)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
