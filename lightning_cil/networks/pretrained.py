"""Backbone weights from a local file (a torchvision state dict or a lightning_cil checkpoint) or torchvision."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["load_pretrained"]

TORCHVISION_PREFIX = "torchvision:"


def _state_dict_of(source: str) -> dict[str, torch.Tensor]:
    if source.startswith(TORCHVISION_PREFIX):  # e.g. torchvision:ResNet18_Weights.IMAGENET1K_V1 (downloads)
        from torchvision.models import get_weight

        return get_weight(source[len(TORCHVISION_PREFIX) :]).get_state_dict(progress=False)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained={source!r} does not exist (a .pth state dict or a .ckpt checkpoint).")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(blob, dict) and "state_dict" in blob:  # a Lightning checkpoint: take its backbone
        return {k[len("backbone.") :]: v for k, v in blob["state_dict"].items() if k.startswith("backbone.")}
    if not isinstance(blob, dict):
        raise ValueError(f"pretrained={source!r} holds a {type(blob).__name__}, not a state dict or checkpoint.")
    return blob


def load_pretrained(backbone: nn.Module, source: str) -> None:
    """Load weights into ``backbone``; a torchvision classifier's state dict fits the ``net.`` wrapper and its
    ``fc`` layer is ignored. Every backbone weight must be present with its shape, or the error lists what differs.
    """
    state = _state_dict_of(source)
    own = backbone.state_dict()
    if not any(k in own for k in state) and any(f"net.{k}" in own for k in state):
        state = {f"net.{k}": v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "net.fc."))}
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
