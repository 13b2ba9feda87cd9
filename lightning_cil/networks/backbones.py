"""Feature extractors. Every backbone maps images to a flat feature vector of size ``out_dim``.

A backbone is given as
- a registered name (``resnet32``, ``resnet20``, ``resnet18``, ``resnet18_cifar``),
- ``timm:<model>``: ``timm.create_model(<model>, num_classes=0)``, its feature size from ``num_features`` and its
  data configuration (input size, mean/std, interpolation) kept as ``data_config`` for the default transforms,
- ``torchvision:<model>``: ``torchvision.models.get_model(<model>)`` with its last linear layer (the classifier)
  replaced by the identity,
- or any ``nn.Module`` (a ``class_path`` in YAML) that returns one feature vector per image.

Weights (``pretrained``): ``hub`` (timm's or torchvision's default weights; needs internet) or a local file, see
``pretrained.py``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet18

from lightning_cil.networks.pretrained import HUB, load_pretrained

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "backbone_name",
    "build_backbone",
    "feature_size",
    "list_backbones",
    "register_backbone",
    "replace_submodule",
]

#: what ``backbone`` accepts: a registered name, ``timm:<model>``, ``torchvision:<model>``, or a module
BackboneSpec = str | nn.Module

TIMM_PREFIX = "timm:"
TORCHVISION_PREFIX = "torchvision:"
#: attributes read, in this order, for the feature size of a module given by the user
SIZE_ATTRIBUTES = ("out_dim", "num_features", "embed_dim", "feature_dim")
#: input sizes of the dummy forward that checks (or finds) a module's feature size, tried in order
PROBE_SIZES = (224, 64, 32)

BACKBONES: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        BACKBONES[name] = builder
        return builder

    return decorator


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def backbone_name(spec: BackboneSpec) -> str:
    """How a backbone is recorded in checkpoints and run files: the name given, or a module's import path."""
    if isinstance(spec, nn.Module):
        return f"{type(spec).__module__}.{type(spec).__qualname__}"
    return spec


def build_backbone(spec: BackboneSpec, in_channels: int = 3, pretrained: str | None = None) -> nn.Module:
    """The feature extractor ``spec`` describes, with an ``out_dim`` attribute and, if given, ``pretrained``
    weights. A module given by the user is used as it is (not copied)."""
    if isinstance(spec, nn.Module):
        backbone = spec
        _set_feature_size(backbone, feature_size(backbone, in_channels, backbone_name(spec)))
    elif not isinstance(spec, str):
        raise ValueError(
            f"backbone={spec!r} must be a name (see list_backbones()), timm:<model>, "
            f"torchvision:<model> or an nn.Module."
        )
    elif spec.startswith(TIMM_PREFIX):
        backbone = _timm_backbone(spec[len(TIMM_PREFIX) :], in_channels, pretrained == HUB)
    elif spec.startswith(TORCHVISION_PREFIX):
        backbone = _torchvision_backbone(spec[len(TORCHVISION_PREFIX) :], in_channels, pretrained == HUB)
    elif spec in BACKBONES:
        backbone = BACKBONES[spec](in_channels=in_channels)
    else:
        raise ValueError(
            f"backbone={spec!r} is unknown; choose one of {list_backbones()}, timm:<model> (e.g. "
            f"timm:vit_base_patch16_224), torchvision:<model> (e.g. torchvision:resnet50), or give a module by "
            f"class_path."
        )
    if pretrained == HUB:
        if not isinstance(spec, str) or not spec.startswith((TIMM_PREFIX, TORCHVISION_PREFIX)):
            raise ValueError(
                f"pretrained='hub' downloads the weights of a timm: or torchvision: backbone; backbone="
                f"{backbone_name(spec)!r} has none there. Give a weights file (pretrained: path/to/weights.pth)."
            )
    elif pretrained is not None:
        load_pretrained(backbone, pretrained)
    return backbone


def replace_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` (dotted, as in ``named_modules``) inside ``root``."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _set_feature_size(backbone: nn.Module, size: int) -> None:
    if getattr(backbone, "out_dim", None) != size:
        backbone.out_dim = size


def feature_size(backbone: nn.Module, in_channels: int, name: str, input_size: int | None = None) -> int:
    """The size of the feature vector ``backbone`` returns, checked by one dummy forward (batch of 2, eval mode).

    The forward runs at ``input_size`` if given, else at the first of :data:`PROBE_SIZES` the module accepts. A
    module that declares its size (:data:`SIZE_ATTRIBUTES`) must return that size; one that no dummy input fits
    is taken at its declared size. Raises if the output is not ``(batch, features)``.
    """
    declared = next((v for a in SIZE_ATTRIBUTES if isinstance(v := getattr(backbone, a, None), int) and v > 0), None)
    errors = []
    for size in (input_size,) if input_size else PROBE_SIZES:
        probe = torch.zeros(2, in_channels, size, size)
        try:
            output = _dummy_forward(backbone, probe)
        except Exception as error:  # a module may refuse an input size: try the next one
            errors.append(f"{size}x{size}: {type(error).__name__}: {error}")
            continue
        if not isinstance(output, Tensor) or output.ndim != 2 or output.shape[0] != 2:
            found = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"backbone {name} returns {found} for an input of shape {tuple(probe.shape)}; a backbone must "
                f"return one feature vector per image, shape (batch, features): end it with global pooling and "
                f"a flatten (a timm model: num_classes=0)."
            )
        if declared is not None and declared != output.shape[1]:
            raise ValueError(
                f"backbone {name} declares {declared} features but returns {output.shape[1]} for an input of shape "
                f"{tuple(probe.shape)}."
            )
        return int(output.shape[1])
    if declared is not None:
        return declared
    raise ValueError(
        f"backbone {name}: no dummy input of sizes {list(PROBE_SIZES)} with {in_channels} channels runs through it "
        f"({errors[-1][:200]}); give the module an `out_dim` attribute with its feature size."
    )


@torch.no_grad()
def _dummy_forward(backbone: nn.Module, probe: Tensor) -> Any:
    was_training = backbone.training
    backbone.eval()
    try:
        return backbone(probe)
    finally:
        backbone.train(was_training)


def _timm_backbone(model: str, in_channels: int, hub: bool) -> nn.Module:
    try:
        import timm
    except ImportError as error:
        raise ValueError(f"backbone='timm:{model}' needs timm: pip install timm ({error}).") from error
    try:
        backbone = timm.create_model(model, pretrained=hub, num_classes=0, in_chans=in_channels)
    except RuntimeError as error:
        if "Unknown model" not in str(error):
            raise
        close = difflib.get_close_matches(model.split(".")[0], timm.list_models(), n=5)
        raise ValueError(
            f"backbone='timm:{model}' is not a timm model; similar names: {close or 'none'} (all: timm.list_models())."
        ) from error
    except Exception as error:  # the hub download: no internet, no such weights tag
        if not hub:
            raise
        raise ValueError(
            f"pretrained='hub': the weights of timm:{model} could not be fetched ({type(error).__name__}: "
            f"{str(error)[:200]}); without internet give a local file: pretrained: path/to/weights.safetensors."
        ) from error
    backbone.data_config = timm.data.resolve_data_config({}, model=backbone)
    size = backbone.data_config["input_size"][-1]
    _set_feature_size(backbone, feature_size(backbone, in_channels, f"timm:{model}", size))
    return backbone


def _torchvision_backbone(model: str, in_channels: int, hub: bool) -> nn.Module:
    from torchvision import models

    if model not in models.list_models():
        close = difflib.get_close_matches(model, models.list_models(), n=5)
        raise ValueError(
            f"backbone='torchvision:{model}' is not a torchvision model; similar names: {close or 'none'} "
            f"(all: torchvision.models.list_models())."
        )
    if in_channels != 3:
        raise ValueError(
            f"backbone='torchvision:{model}' takes RGB images; the data has {in_channels} channel(s). Use a "
            f"registered backbone or timm:<model> (in_chans={in_channels})."
        )
    try:
        net = models.get_model(model, weights=models.get_model_weights(model).DEFAULT if hub else None)
    except Exception as error:
        if not hub:
            raise
        raise ValueError(
            f"pretrained='hub': the weights of torchvision:{model} could not be fetched ({type(error).__name__}: "
            f"{str(error)[:200]}); without internet give a local file: pretrained: path/to/weights.pth."
        ) from error
    linears = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"backbone='torchvision:{model}' has no linear classifier to remove; give it as a module by class_path "
            f"with its own feature output."
        )
    classifier = net.get_submodule(linears[-1])
    replace_submodule(net, linears[-1], nn.Identity())
    net.classifier_path = linears[-1]  # its weights in a torchvision state dict are skipped when loading one
    size = feature_size(net, in_channels, f"torchvision:{model}")
    if size != classifier.in_features:
        raise ValueError(
            f"backbone='torchvision:{model}': removing its last linear layer ({linears[-1]}) leaves {size} outputs, "
            f"not the classifier's {classifier.in_features} inputs; give it as a module by class_path."
        )
    net.out_dim = size
    return net


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


@register_backbone("vit_micro_patch8_32")
def vit_micro_patch8_32(in_channels: int = 3) -> nn.Module:
    """A 2.7M-parameter ViT for 32 px images: timm's ``VisionTransformer`` with 8 px patches, 192 wide, 6 blocks
    of 3 heads, the [CLS] token after the final LayerNorm as feature (192-d). Being timm's ViT, every
    pre-trained-model method (adapters, prompts) runs on it; the project pre-trains it on CIFAR-10 classes that
    its test streams never show (``configs/backbone_vit_cifar10.yaml``) for offline tests and CPU benchmarks."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(
        img_size=32, patch_size=8, in_chans=in_channels, embed_dim=192, depth=6, num_heads=3, num_classes=0
    )
    vit.out_dim = vit.num_features
    return vit
