"""Prompting a frozen timm ``VisionTransformer``: input prompts (L2P) and prefix-tuning of keys and values
(DualPrompt, CODA-Prompt).

A thin layer over timm's modules, not a copy of a ViT: :func:`prompted_tokens` runs the ViT's own patch embedding,
position embedding, blocks and final norm, and only in the prompted blocks computes the attention with timm's own
``qkv``/``proj`` layers, prefixing keys and values with the prompts (:func:`prefix_attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Prefix", "check_promptable", "prefix_attention", "prompted_tokens"]

#: a prompted block's prefixes: (keys, values), each ``[batch, length, dim]``
Prefix = tuple[Tensor, Tensor]


def check_promptable(vit: nn.Module, method: str) -> None:
    """Refuse, naming ``method``, a ViT whose blocks this layer cannot prompt (a gated or non-timm attention)."""
    for index, block in enumerate(vit.blocks):
        attn = getattr(block, "attn", None)
        if attn is None or not hasattr(attn, "qkv") or getattr(attn, "gate", None) is not None:
            raise ValueError(
                f"{method} prefixes the keys and values of timm's standard ViT attention; block {index} "
                f"({type(block).__name__}) has another kind."
            )


def prefix_attention(attn: nn.Module, x: Tensor, prefix: Prefix) -> Tensor:
    """timm's multi-head self-attention (``attn``: its ``Attention`` module) with ``prefix`` keys and values put
    before the sequence's own (prefix-tuning)."""
    batch, length, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    prefix_k, prefix_v = (p.to(x.dtype).reshape(batch, -1, heads, head_dim).transpose(1, 2) for p in prefix)
    k, v = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(batch, length, attn.attn_dim))
    return attn.proj_drop(attn.proj(out))


def _prefixed_block(block: nn.Module, x: Tensor, prefix: Prefix) -> Tensor:
    x = x + block.drop_path1(block.ls1(prefix_attention(block.attn, block.norm1(x), prefix)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def prompted_tokens(
    vit: nn.Module, images: Tensor, prompts: Tensor | None = None, prefixes: dict[int, Prefix] | None = None
) -> Tensor:
    """Every output token of ``vit`` (after its final norm), with ``prompts`` (``[batch, n, dim]``) inserted after the
    [CLS] token before the first block, and the blocks named in ``prefixes`` prefix-tuned."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    if prompts is not None:
        x = torch.cat([x[:, :1], prompts.to(x.dtype), x[:, 1:]], dim=1)
    for index, block in enumerate(vit.blocks):
        x = _prefixed_block(block, x, prefixes[index]) if prefixes and index in prefixes else block(x)
    return vit.norm(x)
