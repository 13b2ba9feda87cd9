"""CODA-Prompt (Smith et al., "CODA-Prompt: COntinual Decomposed Attention-based Prompting for Rehearsal-Free
Continual Learning", CVPR 2023)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_cil.data.scenario import TaskInfo
from lightning_cil.methods.base import CHECKPOINT_KEY
from lightning_cil.methods.prompting import VIT_IN1K, PromptModule
from lightning_cil.methods.schedule import TaskSchedule
from lightning_cil.networks.backbones import BackboneSpec
from lightning_cil.networks.vit_prompts import prompted_tokens

__all__ = ["CODAPrompt"]


def _orthogonal_to(previous: Tensor, count: int, dim: int, generator: torch.Generator) -> Tensor:
    """``count`` unit rows of size ``dim``, orthogonal to each other and to the rows of ``previous`` (Gram-Schmidt on
    random normal vectors, as the current CODA code initialises each task's components). Beyond ``dim`` rows
    orthogonality is impossible and the remaining rows are only normalised."""
    rows = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    basis = [r for r in previous.double()]
    out = []
    for row in rows:
        for b in basis[:dim]:
            row = row - (row @ b) * b
        row = row / row.norm().clamp(min=1e-12)
        basis.append(row)
        out.append(row)
    return torch.stack(out).float()


class CODAPrompt(PromptModule):
    """Prompts assembled per image from a bank of components: ``p = sum_m alpha_m P_m`` with ``alpha_m =
    cos(q * A_m, K_m)`` (q the query, K_m a key and A_m an attention vector per component; no top-k), used as
    prefixes of the keys and values of blocks ``layers`` (0-4); the head reads the [CLS] token.

    - Each task adds ``components_per_task`` components (paper: M = 100 over 10 tasks, so 10), each of
      ``prompt_length`` (8) tokens per layer: the first half prefixes the keys, the second the values.
    - Earlier tasks' components, keys and attention vectors are frozen at each task start (the paper detaches them);
      a test image uses every component so far.
    - New components start orthonormal to the earlier ones (Gram-Schmidt per task, current repo); the loss is
      cross-entropy with the old classes' logits masked, plus ``ortho_weight`` (mu) times
      ``mean((X X^T - I)^2)`` for the keys, attention vectors and flattened components (current repo: mu = 0; the
      first release used 0.1 with an orthogonal init).
    - Official recipe: Adam (0.9, 0.999), lr 1e-3, wd 0, cosine schedule, batch 128, 20 epochs (CIFAR).

    Args:
        backbone / in_channels / pretrained / schedule / first_task / mask_old_logits: see ``PromptModule``.
        components_per_task: components added per task.
        prompt_length: prefix tokens per layer (even: half keys, half values).
        layers: the prompted blocks.
        ortho_weight: the orthogonality penalty's weight (mu).
        init_seed: seed of the components' initialisation (the same on every rank).
    """

    paper_weights = (VIT_IN1K,)

    def __init__(
        self,
        backbone: BackboneSpec = f"timm:{VIT_IN1K}",
        in_channels: int = 3,
        schedule: TaskSchedule | None = None,
        first_task: TaskSchedule | None = None,
        pretrained: str | None = "hub",
        mask_old_logits: bool = True,
        components_per_task: int = 10,
        prompt_length: int = 8,
        layers: list[int] | None = None,
        ortho_weight: float = 0.0,
        init_seed: int = 0,
    ) -> None:
        super().__init__(backbone, in_channels, schedule, first_task, pretrained, mask_old_logits)
        self.layers = [0, 1, 2, 3, 4] if layers is None else list(layers)
        depth = len(self.backbone.blocks)
        if not self.layers or any(not 0 <= layer < depth for layer in self.layers):
            raise ValueError(f"layers={self.layers} must be blocks in 0..{depth - 1}.")
        if prompt_length < 2 or prompt_length % 2:
            raise ValueError(f"prompt_length={prompt_length} must be even (half key, half value tokens).")
        if components_per_task < 1:
            raise ValueError(f"components_per_task={components_per_task} must be at least 1.")
        #: per task: components [n, layers, length, D], keys [n, D], attention vectors [n, D]
        self.components = nn.ParameterList()
        self.component_keys = nn.ParameterList()
        self.component_attention = nn.ParameterList()

    def _add_task_components(self) -> None:
        n, length, dim = self.hparams.components_per_task, self.hparams.prompt_length, self.dim
        generator = torch.Generator().manual_seed(self.hparams.init_seed * 1000 + len(self.components))
        device = self.head.weight.device

        def previous(bank: nn.ParameterList) -> Tensor:
            return torch.cat([p.detach().flatten(1).cpu() for p in bank]) if len(bank) else torch.zeros(0, 0)

        flat = _orthogonal_to(previous(self.components), n, len(self.layers) * length * dim, generator)
        self.components.append(nn.Parameter(flat.reshape(n, len(self.layers), length, dim).to(device)))
        self.component_keys.append(
            nn.Parameter(_orthogonal_to(previous(self.component_keys), n, dim, generator).to(device))
        )
        self.component_attention.append(
            nn.Parameter(_orthogonal_to(previous(self.component_attention), n, dim, generator).to(device))
        )

    def on_task_start(self, task: TaskInfo) -> None:
        super().on_task_start(task)
        for bank in (self.components, self.component_keys, self.component_attention):
            for parameter in bank:
                parameter.requires_grad_(False)
        self._add_task_components()

    def prompt_features(self, images: Tensor, query: Tensor) -> tuple[Tensor, Tensor | None]:
        components = torch.cat(list(self.components))  # [M, layers, length, D]
        keys, attention = torch.cat(list(self.component_keys)), torch.cat(list(self.component_attention))
        attended = F.normalize(query.float()[:, None, :] * attention[None], dim=2)  # [B, M, D]
        alpha = torch.einsum("bmd,md->bm", attended, F.normalize(keys, dim=1))
        prompts = torch.einsum("bm,mlkd->blkd", alpha, components)  # [B, layers, length, D]
        half = self.hparams.prompt_length // 2
        prefixes = {layer: (prompts[:, i, :half], prompts[:, i, half:]) for i, layer in enumerate(self.layers)}
        features = prompted_tokens(self.backbone, images, prefixes=prefixes)[:, 0]
        extra = None
        if self.training and self.hparams.ortho_weight > 0:
            current = (self.components[-1].flatten(1), self.component_keys[-1], self.component_attention[-1])
            extra = self.hparams.ortho_weight * sum(_orthogonality_penalty(x) for x in current)
        return features, extra

    def architecture(self) -> dict[str, Any]:
        return {**super().architecture(), "component_tasks": len(self.components)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        while len(self.components) < checkpoint[CHECKPOINT_KEY]["component_tasks"]:
            self._add_task_components()
        for bank in (self.components, self.component_keys, self.component_attention):
            for i, parameter in enumerate(bank):
                parameter.requires_grad_(i == len(bank) - 1 and self._resuming_inside_task(checkpoint))

    @staticmethod
    def _resuming_inside_task(checkpoint: dict[str, Any]) -> bool:
        state = checkpoint.get("callbacks", {}).get("TaskStream", {})
        return int(state.get("completed_task", -1)) < int(checkpoint[CHECKPOINT_KEY]["task_index"])


def _orthogonality_penalty(x: Tensor) -> Tensor:
    x = x.float()
    return ((x @ x.T - torch.eye(len(x), device=x.device)) ** 2).mean()
