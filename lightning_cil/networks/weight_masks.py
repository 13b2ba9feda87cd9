"""Per-weight task masks on a frozen network: Piggyback's learned binary masks and PackNet's owner map.

Both attach to every convolution and linear layer of a backbone through ``torch.nn.utils.parametrize``, so
the layers keep their code and the effective weight is computed from the frozen one at each forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["PackNetWeight", "PiggybackMask", "attach", "mask_bytes", "masked_layers", "pack_bits", "unpack_bits"]


def masked_layers(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every convolution and linear layer, in module order (the order masks are packed in)."""
    return [(name, m) for name, m in backbone.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def pack_bits(mask: Tensor) -> Tensor:
    """A flat boolean mask as uint8, 8 weights per byte (ceil(n / 8) bytes)."""
    flat = mask.flatten().to(torch.uint8)
    flat = nn.functional.pad(flat, (0, (-len(flat)) % 8)).view(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (flat * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """The first ``n`` booleans of a :func:`pack_bits` result."""
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    return ((packed[:, None] >> shifts) & 1).flatten()[:n].bool()


class _StraightThrough(torch.autograd.Function):
    """(scores > threshold) forward; the gradient passes to the scores unchanged (Piggyback's estimator)."""

    @staticmethod
    def forward(ctx, scores: Tensor, threshold: float) -> Tensor:
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class PiggybackMask(nn.Module):
    """Parametrization ``weight * mask``: the mask is learned (real scores, thresholded) for the training task, or
    a fixed binary mask of a finished task (set by the method when it switches tasks)."""

    def __init__(self, shape: torch.Size, init: float, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.fixed_shape = tuple(shape)
        self.numel_weights = math.prod(shape)
        self.scores = nn.Parameter(torch.full(shape, init))
        self.fixed: Tensor | None = None

    def binary(self) -> Tensor:
        return self.scores.detach() > self.threshold

    def forward(self, weight: Tensor) -> Tensor:
        if self.fixed is not None:
            return weight * self.fixed.view_as(weight).to(weight.dtype)
        return weight * _StraightThrough.apply(self.scores, self.threshold).to(weight.dtype)


class PackNetWeight(nn.Module):
    """Parametrization for PackNet: each weight has an owner (0 = free, t + 1 = task t).

    The effective weight takes the frozen copy of weights owned by tasks ``1..visible`` (owner codes), the
    trainable copy where the owner code equals ``trainable`` (0: the free weights, before pruning; t + 1: the
    task's kept weights, while retraining; None: nothing trains), and zero elsewhere. Gradients reach only the
    trainable positions, and whatever the optimizer does to the trainable copy elsewhere (weight decay,
    momentum) is never used, so earlier tasks' weights stay bitwise unchanged.
    """

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("owner", torch.zeros(weight.shape, dtype=torch.uint8))
        self.register_buffer("frozen", weight.detach().clone())
        self.visible = 0
        self.trainable: int | None = 0

    def forward(self, weight: Tensor) -> Tensor:
        older = (self.owner > 0) & (self.owner <= self.visible)
        out = torch.where(
            older, self.frozen.to(weight.dtype), torch.zeros((), dtype=weight.dtype, device=weight.device)
        )
        if self.trainable is not None:
            out = torch.where(self.owner == self.trainable, weight, out)
        return out


def attach(backbone: nn.Module, make: Callable[[Tensor], nn.Module]) -> list[nn.Module]:
    """Parametrize every masked layer's weight with ``make(weight)``; returns the parametrizations in order."""
    attached = []
    for _, layer in masked_layers(backbone):
        parametrization = make(layer.weight)
        parametrize.register_parametrization(layer, "weight", parametrization, unsafe=True)
        attached.append(parametrization)
    return attached


def mask_bytes(parametrizations: list[PiggybackMask]) -> int:
    """Bytes of one task's packed mask: ceil(n / 8) for n masked weights."""
    return math.ceil(sum(p.numel_weights for p in parametrizations) / 8)
