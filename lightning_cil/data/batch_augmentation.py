"""Augmentation of a whole batch on the training device, for datasets held in memory as ``uint8`` tensors.

The loader then only gathers and collates ``uint8`` images (a quarter of the bytes of float images to copy
to the device), and the random crop, flip, brightness jitter and normalisation run as a few batched tensor
operations on the GPU, with an independent draw per sample. The presets match the CPU pipelines of
``transforms.py`` in distribution (a test compares them), not draw for draw: the random numbers come from
one generator per (seed, epoch, rank) on the device instead of one seed per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_cil.data.transforms import CIFAR10_STATS, CIFAR100_STATS, DIGITS_STATS, IMAGENET_STATS

__all__ = ["BATCH_PRESETS", "BatchAugmentation", "build_batch_augmentation"]


@dataclass(frozen=True)
class BatchAugmentation:
    """Random crop with zero padding, horizontal flip and brightness jitter of a ``uint8 [B, C, H, W]`` batch,
    then scaling to [0, 1] and normalisation; returns ``float32 [B, C, H, W]``.

    Args:
        padding: ``RandomCrop(size, padding)``: pad every side with zeros, then crop the original size at a
            uniformly drawn offset (0: no crop).
        flip: mirror each image with probability 1/2 (``RandomHorizontalFlip``).
        brightness: ``ColorJitter(brightness=b)``: scale each image by a factor drawn from [max(0, 1 - b), 1 + b],
            clip and truncate to integers as torchvision does on ``uint8`` images (None: no jitter).
        mean / std: per-channel normalisation.
    """

    padding: int
    flip: bool
    brightness: float | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"batch augmentation takes uint8 [B, C, H, W] images, got {images.dtype} {images.shape}.")
        b, _, h, w = images.shape
        device = images.device
        x = images
        if self.padding or self.flip:
            rows = torch.arange(h, device=device).expand(b, h)
            cols = torch.arange(w, device=device).expand(b, w)
            if self.padding:
                p = self.padding
                x = F.pad(x, (p, p, p, p))
                rows = rows + torch.randint(0, 2 * p + 1, (b, 1), generator=generator, device=device)
                cols = cols + torch.randint(0, 2 * p + 1, (b, 1), generator=generator, device=device)
            if self.flip:
                mirrored = torch.rand(b, 1, generator=generator, device=device) < 0.5
                cols = torch.where(mirrored, cols.flip(1), cols)
            batch = torch.arange(b, device=device)[:, None, None]
            x = x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # one gather: crop + flip
        x = x.float()
        if self.brightness:
            low, high = max(0.0, 1.0 - self.brightness), 1.0 + self.brightness
            factor = torch.empty(b, 1, 1, 1, device=device).uniform_(low, high, generator=generator)
            x = (x * factor).clamp_(0, 255).floor_()
        return self.normalize(x)

    def normalize(self, images: Tensor) -> Tensor:
        """Scale to [0, 1] and normalise (the test-time transform), as a contiguous float32 batch."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return ((images.float() / 255 - mean) / std).contiguous()


#: presets that run batch-wise: fixed-size images, crop/flip/brightness only (see ``transforms.TRANSFORM_PRESETS``)
BATCH_PRESETS: dict[str, BatchAugmentation] = {
    "cifar10": BatchAugmentation(4, True, None, *CIFAR10_STATS),
    "cifar100": BatchAugmentation(4, True, None, *CIFAR100_STATS),
    "cifar100_der": BatchAugmentation(4, True, 63 / 255, *CIFAR100_STATS),
    "digits": BatchAugmentation(1, False, None, *DIGITS_STATS),
    "none": BatchAugmentation(0, False, None, *IMAGENET_STATS),
}


def build_batch_augmentation(preset: str) -> BatchAugmentation:
    if preset not in BATCH_PRESETS:
        raise ValueError(
            f"data.gpu_augmentation supports the augmentation presets {sorted(BATCH_PRESETS)}; "
            f"augmentation={preset!r} crops and resizes each image to its own scale, which stays on the loader "
            f"workers (set gpu_augmentation: false)."
        )
    return BATCH_PRESETS[preset]
