"""A feature extractor that grows by one copy per task (DER's super-feature), optionally channel-pruned."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from lightning_cil.networks.backbones import BackboneSpec, build_backbone
from lightning_cil.networks.channel_pruning import ChannelGates, prune_channels

__all__ = ["ExpandableBackbone"]


class ExpandableBackbone(nn.Module):
    """Concatenation of per-task extractors F_1..F_t; all but the newest are frozen (weights and BN).

    ``expand()`` appends F_t initialised from F_{t-1}; it must run between fits. ``out_dim`` is the
    super-feature size, ``newest_dim`` the size of F_t's features (the auxiliary head's input).

    With pruning, ``attach_gates()`` puts learned channel masks on F_t and ``prune_newest()`` removes the
    channels they switched off at the task end. The full-width F_t is kept frozen as ``template`` until the
    next ``expand()``, which copies it: the next extractor starts from everything F_t learned, not from its
    pruned remains. ``kept_channels[i]`` records how extractor i was pruned (None: not pruned).
    """

    def __init__(self, spec: BackboneSpec, in_channels: int = 3, pretrained: str | None = None) -> None:
        super().__init__()
        self.extractors = nn.ModuleList([build_backbone(spec, in_channels, pretrained)])
        self.gates: ChannelGates | None = None
        self.template: nn.Module | None = None
        self.kept_channels: list[list[Tensor] | None] = [None]

    @property
    def data_config(self) -> dict | None:
        """The input the extractors were built for (timm's data config), if known."""
        return getattr(self.extractors[0], "data_config", None)

    @property
    def out_dim(self) -> int:
        return sum(e.out_dim for e in self.extractors)

    @property
    def newest_dim(self) -> int:
        return self.extractors[-1].out_dim

    def expand(self) -> None:
        source = self.template if self.template is not None else self.extractors[-1]
        extractor = copy.deepcopy(source).requires_grad_(True).train(self.training)
        self.extractors.append(extractor)
        self.kept_channels.append(None)
        self.template = None
        self.freeze_old()

    def freeze_old(self) -> None:
        for extractor in self.extractors[:-1]:
            extractor.requires_grad_(False)
            extractor.eval()

    def attach_gates(self, s_max: float) -> ChannelGates:
        """Learned channel masks on the newest extractor (DER's pruning stage)."""
        self.gates = ChannelGates(self.extractors[-1], s_max).to(next(self.extractors[-1].parameters()).device)
        self.gates.attach(self.extractors[-1])
        return self.gates

    @torch.no_grad()
    def prune_newest(self) -> Tensor:
        """Remove the newest extractor's masked-off channels; returns the kept indices of its features."""
        assert self.gates is not None, "prune_newest() needs attach_gates() first"
        kept = self.gates.kept()
        last_stage = self.gates.layout.stages - 1
        self.gates.detach()
        self.gates = None
        newest = self.extractors[-1]
        self.template = copy.deepcopy(newest).requires_grad_(False).eval()
        prune_channels(newest, kept)
        self.kept_channels[-1] = kept
        return kept[last_stage]

    def rebuild(self, kept_channels: list[list[list[int]] | None], template: bool, s_max: float | None) -> None:
        """Recreate the shapes a checkpoint describes (extractor count, pruning, template, gates) so its
        weights can be loaded. Copies the first extractor, so no random numbers are drawn."""
        base = self.extractors[0]
        extractors = []
        for kept in kept_channels:
            extractor = copy.deepcopy(base)
            if kept is not None:
                prune_channels(extractor, [torch.tensor(k, dtype=torch.long) for k in kept])
            extractors.append(extractor)
        self.template = copy.deepcopy(base) if template else None
        self.extractors = nn.ModuleList(extractors)
        self.kept_channels = [
            None if k is None else [torch.tensor(g, dtype=torch.long) for g in k] for k in kept_channels
        ]
        self.gates = None
        if s_max is not None:
            self.attach_gates(s_max)
        self.extractors[-1].requires_grad_(True)
        self.freeze_old()
        if self.template is not None:
            self.template.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> ExpandableBackbone:
        super().train(mode)
        for extractor in self.extractors[:-1]:
            extractor.eval()  # frozen BatchNorm statistics stay as they were
        if self.template is not None:
            self.template.eval()
        return self

    def forward_all(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(super-feature, newest extractor's feature)."""
        features = [extractor(x) for extractor in self.extractors]
        return torch.cat(features, dim=1), features[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_all(x)[0]
