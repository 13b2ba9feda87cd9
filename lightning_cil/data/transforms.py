"""Augmentation presets of the CIL literature, as torchvision v2 pipelines on ``uint8`` image tensors."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torchvision.transforms import v2

__all__ = ["TRANSFORM_PRESETS", "DEFAULT_PRESET", "build_transforms", "runs_batchwise", "transforms_for_data_config"]

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DIGITS_STATS = ((0.3,), (0.35,))


def _finish(stats) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(*stats)]


def _cifar(stats, color_jitter: bool = False):
    train = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
    if color_jitter:  # DER's CIFAR pipeline adds brightness jitter of 63/255
        train.append(v2.ColorJitter(brightness=63 / 255))
    return v2.Compose(train + _finish(stats)), v2.Compose(_finish(stats))


def _imagenet():
    train = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(), *_finish(IMAGENET_STATS)])
    test = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224), *_finish(IMAGENET_STATS)])
    return train, test


def _small_images(size: int):
    """Small natural images (e.g. PACS at 64px, or downscaled to 32px): mild crop-and-resize and flip."""
    train = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.7, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            *_finish(IMAGENET_STATS),
        ]
    )
    return train, v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size), *_finish(IMAGENET_STATS)])


def _digits():
    # Digits are not mirror-symmetric: a 1-pixel shift is the only augmentation that keeps them valid.
    return v2.Compose([v2.RandomCrop(8, padding=1), *_finish(DIGITS_STATS)]), v2.Compose(_finish(DIGITS_STATS))


#: preset -> () -> (train transform, test transform)
TRANSFORM_PRESETS: dict[str, Callable[[], tuple[v2.Transform, v2.Transform]]] = {
    "cifar10": lambda: _cifar(CIFAR10_STATS),
    "cifar100": lambda: _cifar(CIFAR100_STATS),
    "cifar100_der": lambda: _cifar(CIFAR100_STATS, color_jitter=True),
    "imagenet": _imagenet,
    "small64": lambda: _small_images(64),
    "small32": lambda: _small_images(32),  # the same, downscaled for CIFAR-sized backbones and CPU budgets
    "digits": _digits,
    "none": lambda: (v2.Compose(_finish(IMAGENET_STATS)), v2.Compose(_finish(IMAGENET_STATS))),
}

#: the preset a dataset gets when ``data.augmentation`` is not set
DEFAULT_PRESET = {
    "digits": "digits",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "imagenet100": "imagenet",
    "imagenet1000": "imagenet",
    "imagenet_r": "imagenet",
    "imagenet_a": "imagenet",
    "cub200": "imagenet",
    "objectnet": "imagenet",
    "omnibenchmark": "imagenet",
    "vtab": "imagenet",
    "imagefolder": "imagenet",
    "domains": "small64",
}


def build_transforms(preset: str) -> tuple[v2.Transform, v2.Transform]:
    if preset not in TRANSFORM_PRESETS:
        raise ValueError(f"augmentation={preset!r} is unknown; choose one of {sorted(TRANSFORM_PRESETS)}.")
    return TRANSFORM_PRESETS[preset]()


def transforms_for_data_config(config: dict, channels: int = 3) -> tuple[v2.Transform, v2.Transform]:
    """Train and test pipelines for a backbone's data config (timm's ``resolve_data_config``: ``input_size``,
    ``interpolation``, ``mean``, ``std``, ``crop_pct``) on uint8 tensors. Testing is timm's evaluation transform:
    resize to ``size / crop_pct``, centre crop. Training is random resized crop and flip; timm's training
    transform also jitters colours (0.4) by default, which is left to ``train_transforms`` here."""
    size = int(config["input_size"][-1])
    interpolation = v2.InterpolationMode(config.get("interpolation", "bilinear"))
    mean, std = tuple(config["mean"]), tuple(config["std"])
    if len(mean) != channels:  # e.g. an RGB model's statistics for grey images: their channel means
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    stats = (mean, std)
    train = v2.Compose(
        [
            v2.RandomResizedCrop(size, interpolation=interpolation, antialias=True),
            v2.RandomHorizontalFlip(),
            *_finish(stats),
        ]
    )
    resize = math.floor(size / config.get("crop_pct", 0.875))
    test = v2.Compose(
        [v2.Resize(resize, interpolation=interpolation, antialias=True), v2.CenterCrop(size), *_finish(stats)]
    )
    return train, test


#: transforms that treat each image alone and draw no random numbers
_DETERMINISTIC_PER_IMAGE = (v2.ToDtype, v2.Normalize, v2.Resize, v2.CenterCrop, v2.ToPureTensor, v2.Identity)


def runs_batchwise(transform: Callable) -> bool:
    """Whether ``transform`` gives every image of a stacked batch ``[B, C, H, W]`` what it gives that image alone:
    a pipeline of deterministic per-image steps (dtype, normalisation, resize, centre crop), as evaluation uses.
    A random step would draw once for the whole batch."""
    steps = transform.transforms if isinstance(transform, v2.Compose) else [transform]
    return all(type(step) in _DETERMINISTIC_PER_IMAGE for step in steps)
