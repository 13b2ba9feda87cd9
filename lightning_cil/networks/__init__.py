"""Backbones (by name) and incremental heads."""

from lightning_cil.networks.backbones import BACKBONES, build_backbone, list_backbones, register_backbone
from lightning_cil.networks.expandable import ExpandableBackbone
from lightning_cil.networks.heads import IncrementalLinear

__all__ = [
    "BACKBONES",
    "ExpandableBackbone",
    "IncrementalLinear",
    "build_backbone",
    "list_backbones",
    "register_backbone",
]
