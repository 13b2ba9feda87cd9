"""A feature extractor that grows by one copy per task (DER's super-feature)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from lightning_cil.networks.backbones import build_backbone

__all__ = ["ExpandableBackbone"]


class ExpandableBackbone(nn.Module):
    """Concatenation of per-task extractors F_1..F_t; all but the newest are frozen (weights and BN).

    ``expand()`` appends F_t initialised from F_{t-1}; it must run between fits. ``out_dim`` is the
    super-feature size, ``newest_dim`` the size of F_t's features (the auxiliary head's input).
    """

    def __init__(self, name: str, in_channels: int = 3) -> None:
        super().__init__()
        self.extractors = nn.ModuleList([build_backbone(name, in_channels)])

    @property
    def out_dim(self) -> int:
        return sum(e.out_dim for e in self.extractors)

    @property
    def newest_dim(self) -> int:
        return self.extractors[-1].out_dim

    def expand(self) -> None:
        self.extractors.append(copy.deepcopy(self.extractors[-1]))
        self.freeze_old()

    def freeze_old(self) -> None:
        for extractor in self.extractors[:-1]:
            extractor.requires_grad_(False)
            extractor.eval()

    def train(self, mode: bool = True) -> ExpandableBackbone:
        super().train(mode)
        for extractor in self.extractors[:-1]:
            extractor.eval()  # frozen BatchNorm statistics stay as they were
        return self

    def forward_all(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(super-feature, newest extractor's feature)."""
        features = [extractor(x) for extractor in self.extractors]
        return torch.cat(features, dim=1), features[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_all(x)[0]
