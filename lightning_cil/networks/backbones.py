"""Feature extractors by name. Every backbone maps images to a flat feature vector of size ``out_dim``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet18

__all__ = ["BACKBONES", "build_backbone", "list_backbones", "register_backbone"]

BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        BACKBONES[name] = builder
        return builder

    return decorator


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def build_backbone(name: str, in_channels: int = 3) -> nn.Module:
    """A backbone from the registry; it has an ``out_dim`` attribute."""
    if name not in BACKBONES:
        raise ValueError(f"backbone={name!r} is unknown; choose one of {list_backbones()}.")
    return BACKBONES[name](in_channels=in_channels)


class _CifarBlock(nn.Module):
    """Basic residual block with the parameter-free (zero-padding, "option A") shortcut of He et al."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - in_planes
        self.stride = stride
        self.register_buffer("shortcut_index", None, persistent=False)

    def set_shortcut_index(self, index: Tensor) -> None:
        """After channel pruning: output channel j of the shortcut is input channel ``index[j]``, or zero where
        ``index[j]`` equals the number of input channels."""
        self.shortcut_index = index

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.shortcut_index is not None:
            shortcut = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, 1))
            shortcut = shortcut.index_select(1, self.shortcut_index)
        elif self.stride != 1 or self.pad:
            shortcut = x[:, :, :: self.stride, :: self.stride]
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs (He et al., 2016, Sec. 4.2): 6n+2 layers, widths 16/32/64, 64-d features."""

    def __init__(self, depth: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}.")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_CifarBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.out_dim = 64
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class _TorchvisionFeatures(nn.Module):
    """A torchvision classifier with its final layer removed."""

    def __init__(self, net: nn.Module, out_dim: int) -> None:
        super().__init__()
        net.fc = nn.Identity()
        self.net = net
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@register_backbone("resnet32")
def resnet32(in_channels: int = 3) -> nn.Module:
    """ResNet-32 for CIFAR, the backbone of iCaRL and PyCIL (64-d features)."""
    return CifarResNet(32, in_channels)


@register_backbone("resnet20")
def resnet20(in_channels: int = 3) -> nn.Module:
    """ResNet-20 for CIFAR (smaller and faster than ResNet-32)."""
    return CifarResNet(20, in_channels)


@register_backbone("resnet18")
def resnet18_imagenet(in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 (ImageNet stem: 7x7 stride-2 conv and max-pool), 512-d features."""
    net = resnet18()
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return _TorchvisionFeatures(net, 512)


@register_backbone("resnet18_cifar")
def resnet18_cifar(in_channels: int = 3) -> nn.Module:
    """ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool), as in DER's and Mammoth's code."""
    net = resnet18()
    net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return _TorchvisionFeatures(net, 512)
