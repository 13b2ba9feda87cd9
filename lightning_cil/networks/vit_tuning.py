"""Parameter-efficient tuning (PET) of a timm ``VisionTransformer``: AdaptFormer adapters, SSF and visual prompts.

A thin layer over timm's modules, not a copy of a ViT: each block is wrapped by :class:`TunedBlock`, which runs the
block's own ``norm1``/``attn``/``ls1``/``drop_path1``/``norm2``/``mlp``/``ls2``/``drop_path2`` and adds the PET
module's contribution. The PET can be switched off (:func:`pet_disabled`), which gives back exactly the pre-trained
network: APER's prototypes concatenate the features of both without keeping a second copy of the ViT.

- ``adapter`` (AdaptFormer, Chen et al. 2022): in every block, parallel to the MLP and reading the post-attention
  residual stream, ``down (d -> bottleneck) -> ReLU -> dropout -> up (-> d)``, scaled (0.1) and added; the
  up-projection starts at zero, so the tuned network starts as the pre-trained one.
- ``ssf`` (Lian et al. 2022): a per-channel scale (init 1) and shift (init 0) after every linear layer and
  LayerNorm of every block (and the final norm).
- ``vpt_shallow`` / ``vpt_deep`` (Jia et al. 2022): ``prompt_tokens`` zero-initialised tokens inserted after the
  [CLS] token before the first block (shallow), or replaced by each block's own before every block (deep).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "PET_KINDS",
    "Adapter",
    "PetKind",
    "SSF",
    "TunedBlock",
    "add_pet",
    "pet_disabled",
    "pet_parameters",
    "vit_of",
]

PetKind = Literal["adapter", "ssf", "vpt_shallow", "vpt_deep"]
PET_KINDS: tuple[str, ...] = ("adapter", "ssf", "vpt_shallow", "vpt_deep")


def vit_of(backbone: nn.Module, method: str) -> nn.Module:
    """``backbone`` if it is a timm VisionTransformer with one [CLS] token; else a one-line error naming ``method``."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(backbone, VisionTransformer):
        raise ValueError(
            f"{method} tunes or prompts a timm VisionTransformer (e.g. backbone: timm:vit_base_patch16_224.augreg_in21k"
            f" or vit_micro_patch8_32); backbone {type(backbone).__name__} is not one."
        )
    if getattr(backbone, "num_prefix_tokens", 1) != 1 or backbone.cls_token is None:
        raise ValueError(
            f"{method} reads the [CLS] token of a ViT with exactly one prefix token; this one has "
            f"{backbone.num_prefix_tokens} (register tokens or no class token are not supported)."
        )
    return backbone


class Adapter(nn.Module):
    """AdaptFormer's bottleneck: ``scale * up(dropout(relu(down(x))))``, the up-projection zero-initialised."""

    def __init__(self, dim: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.dropout(torch.relu(self.down(x)))) * self.scale


class SSF(nn.Module):
    """A per-channel scale and shift of the last dimension (identity at initialisation)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


class _Scaled(nn.Module):
    """A module followed by an SSF of its output (switched off with the block's PET)."""

    def __init__(self, module: nn.Module, dim: int, block: TunedBlock) -> None:
        super().__init__()
        self.module = module
        self.ssf = SSF(dim)
        self._block = [block]  # a list: not a submodule (no cycle in the module tree)

    def forward(self, x: Tensor) -> Tensor:
        out = self.module(x)
        return self.ssf(out) if self._block[0].enabled else out


class TunedBlock(nn.Module):
    """A timm ViT ``Block`` with a PET module; with ``enabled`` False it computes exactly the original block."""

    def __init__(self, block: nn.Module, kind: PetKind, index: int, bottleneck: int, prompt_tokens: int) -> None:
        super().__init__()
        self.block = block
        self.kind = kind
        self.enabled = True
        dim = block.norm1.normalized_shape[0]
        self.dim, self.bottleneck = dim, bottleneck
        #: adapter sets (EASE adds one per task); ``active_adapter`` is the one the forward uses
        self.adapters = nn.ModuleList([Adapter(dim, bottleneck)] if kind == "adapter" else [])
        self.active_adapter = 0
        deep = kind == "vpt_deep"
        has_prompt = deep or (kind == "vpt_shallow" and index == 0)
        self.prompt = nn.Parameter(torch.zeros(prompt_tokens, dim)) if has_prompt else None
        #: prompt tokens already in the sequence that this block's prompts replace (VPT-deep after the first block)
        self.replaces = prompt_tokens if deep and index > 0 else 0
        if kind == "ssf":
            for name in ("norm1", "norm2"):
                setattr(block, name, _Scaled(getattr(block, name), dim, self))
            attn, mlp = block.attn, block.mlp
            attn.qkv = _Scaled(attn.qkv, attn.qkv.out_features, self)
            attn.proj = _Scaled(attn.proj, dim, self)
            mlp.fc1 = _Scaled(mlp.fc1, mlp.fc1.out_features, self)
            mlp.fc2 = _Scaled(mlp.fc2, dim, self)

    def forward(self, x: Tensor) -> Tensor:
        if self.enabled and self.prompt is not None:
            prompts = self.prompt.to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], prompts, x[:, 1 + self.replaces :]], dim=1)
        b = self.block
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x))))
        out = x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))
        if self.enabled and len(self.adapters):
            out = out + self.adapters[self.active_adapter](x)
        return out

    def pet_parameters(self) -> list[nn.Parameter]:
        if self.kind == "adapter":
            return list(self.adapters.parameters())
        if self.kind == "ssf":
            return [p for m in self.modules() if isinstance(m, SSF) for p in m.parameters()]
        return [self.prompt] if self.prompt is not None else []


def add_pet(
    vit: nn.Module, kind: PetKind, bottleneck: int = 64, prompt_tokens: int = 5, method: str = "this method"
) -> list[nn.Parameter]:
    """Wrap every block of ``vit`` (in place) with a ``kind`` PET module; returns the PET's parameters. Load the
    pre-trained weights before: the wrapped blocks' state-dict keys gain a ``block.`` level."""
    vit_of(vit, method)
    if kind not in PET_KINDS:
        raise ValueError(f"pet={kind!r} is unknown; choose one of {list(PET_KINDS)}.")
    if kind in ("vpt_shallow", "vpt_deep") and prompt_tokens < 1:
        raise ValueError(f"prompt_tokens={prompt_tokens} must be at least 1 for {kind}.")
    vit.blocks = nn.Sequential(
        *(TunedBlock(block, kind, i, bottleneck, prompt_tokens) for i, block in enumerate(vit.blocks))
    )
    params = [p for block in vit.blocks for p in block.pet_parameters()]
    if kind == "ssf":
        vit.norm = _Scaled(vit.norm, vit.num_features, vit.blocks[-1])
        params += list(vit.norm.ssf.parameters())
    return params


def _tuned_blocks(vit: nn.Module) -> Iterator[TunedBlock]:
    return (block for block in vit.blocks if isinstance(block, TunedBlock))


def pet_parameters(vit: nn.Module) -> list[nn.Parameter]:
    """The PET parameters :func:`add_pet` added to ``vit`` (none if it has no PET)."""
    params = [p for block in _tuned_blocks(vit) for p in block.pet_parameters()]
    if isinstance(vit.norm, _Scaled):
        params += list(vit.norm.ssf.parameters())
    return params


def add_adapter_set(vit: nn.Module) -> list[nn.Parameter]:
    """One more adapter in every block of an adapter-tuned ``vit`` (made active); returns its parameters."""
    params = []
    for block in _tuned_blocks(vit):
        device = next(block.block.parameters()).device
        block.adapters.append(Adapter(block.dim, block.bottleneck).to(device))
        block.active_adapter = len(block.adapters) - 1
        params += list(block.adapters[-1].parameters())
    return params


def num_adapter_sets(vit: nn.Module) -> int:
    return next((len(block.adapters) for block in _tuned_blocks(vit)), 0)


@contextmanager
def adapter_set(vit: nn.Module, index: int) -> Iterator[nn.Module]:
    """Within the block, ``vit`` runs with its ``index``-th adapter set."""
    blocks = list(_tuned_blocks(vit))
    states = [block.active_adapter for block in blocks]
    for block in blocks:
        block.active_adapter = index
    try:
        yield vit
    finally:
        for block, state in zip(blocks, states):
            block.active_adapter = state


@contextmanager
def pet_disabled(vit: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``vit`` computes the pre-trained network (every PET module off)."""
    blocks = list(_tuned_blocks(vit))
    states = [block.enabled for block in blocks]
    for block in blocks:
        block.enabled = False
    try:
        yield vit
    finally:
        for block, state in zip(blocks, states):
            block.enabled = state
