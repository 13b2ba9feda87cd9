"""Backbone weights: downloaded from the hub (timm, torchvision; needs internet) or read from a local file.

A local file is a state dict (``.pth``/``.pt``/``.bin`` by ``torch.load``, ``.safetensors``), possibly nested
under ``model`` or ``state_dict`` as many training scripts save it, or a lightning_cil checkpoint (``.ckpt``: its
``backbone.`` weights). The classifier of the network the file was saved from is skipped; every other weight must
fit the backbone by name and shape.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["HUB", "load_pretrained"]

#: ``pretrained: hub``: timm's or torchvision's own weights of the backbone (downloads)
HUB = "hub"
TORCHVISION_WEIGHTS_PREFIX = "torchvision:"


def _read(path: Path) -> object:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=False)


def _state_dict_of(source: str) -> dict[str, Tensor]:
    if source.startswith(TORCHVISION_WEIGHTS_PREFIX):  # e.g. torchvision:ResNet18_Weights.IMAGENET1K_V1 (downloads)
        from torchvision.models import get_weight

        return get_weight(source[len(TORCHVISION_WEIGHTS_PREFIX) :]).get_state_dict(progress=False)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained={source!r} does not exist (looked for {path.resolve()}); give a weights file (.pth, .pt, "
            f".bin, .safetensors, a .ckpt checkpoint) or 'hub' for a timm:/torchvision: backbone's own weights."
        )
    blob = _read(path)
    if isinstance(blob, dict) and "state_dict" in blob and "lightning_cil" in blob:  # a lightning_cil checkpoint
        return {k[len("backbone.") :]: v for k, v in blob["state_dict"].items() if k.startswith("backbone.")}
    for key in ("state_dict", "model"):  # e.g. a Lightning checkpoint, or DeiT-style {"model": ...}
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
            break
    if not isinstance(blob, dict) or not all(isinstance(v, Tensor) for v in blob.values()):
        raise ValueError(f"pretrained={source!r} holds a {type(blob).__name__}, not a state dict or checkpoint.")
    return blob


def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    """Where the classifier of the network the weights came from sits (its weights are not the backbone's)."""
    prefixes = ["fc.", "net.fc."]  # torchvision ResNets (plain, and inside the registered backbones' wrapper)
    timm_classifier = getattr(backbone, "pretrained_cfg", {}).get("classifier")
    if isinstance(timm_classifier, str):
        prefixes.append(f"{timm_classifier}.")
    if isinstance(getattr(backbone, "classifier_path", None), str):  # a torchvision: backbone's removed classifier
        prefixes.append(f"{backbone.classifier_path}.")
    return tuple(prefixes)


def load_pretrained(backbone: nn.Module, source: str) -> None:
    """Load weights into ``backbone``; a torchvision classifier's state dict fits the ``net.`` wrapper and the
    classifier is ignored. Every backbone weight must be present with its shape, or the error lists what differs.
    """
    state = _state_dict_of(source)
    own = backbone.state_dict()
    if not any(k in own for k in state) and any(f"net.{k}" in own for k in state):
        state = {f"net.{k}": v for k, v in state.items()}
    classifier = _classifier_prefixes(backbone)
    state = {k: v for k, v in state.items() if k in own or not k.startswith(classifier)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        details = [
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}" if missing else "",
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}" if unexpected else "",
            f"shape mismatch {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in wrong[:3]]}" if wrong else "",
        ]
        raise ValueError(
            f"pretrained={source!r} does not fit the backbone ({type(backbone).__name__}): "
            + "; ".join(d for d in details if d)
            + ". Use weights saved from the same backbone architecture."
        )
    backbone.load_state_dict(state)
