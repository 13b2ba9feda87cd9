"""DualPrompt (Wang et al., "DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning", ECCV
2022)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_cil.data.scenario import TaskInfo
from lightning_cil.methods.prompting import PromptModule
from lightning_cil.methods.schedule import TaskSchedule
from lightning_cil.networks.backbones import BackboneSpec
from lightning_cil.networks.vit_prompts import prompted_tokens

__all__ = ["DualPrompt"]


class DualPrompt(PromptModule):
    """A shared G(eneral)-prompt in the first blocks and one E(xpert)-prompt per task in the next ones, both as
    prefixes of the attention's keys and values; the head reads the [CLS] token.

    - G-prompt: ``g_length`` (5) key and as many value tokens in blocks ``g_layers`` (0, 1), shared by all tasks.
    - E-prompts: one per task (a pool of ``pool_size``, 10), ``e_length`` (5 on CIFAR, 20 on ImageNet-R) key and value
      tokens in blocks ``e_layers`` (2, 3, 4), each with a key. Training uses the current task's E-prompt
      (``use_prompt_mask``) and pulls its key toward the queries (``pull_weight``, 1.0); at test time the E-prompt of
      the key most similar to the query is used (top-1), among the tasks seen so far.
    - At each task start the new E-prompt and key start as copies of the previous task's (``shared_prompt_pool``).
    - Loss: cross-entropy with the old classes' logits masked, plus the pull term. Official recipe on CIFAR: Adam lr
      0.03, constant, wd 0, gradient clipping 1.0, batch 24 per device, 5 epochs.

    Deviation: the key match at test time ranges over the seen tasks' keys, not the whole pool (the unused keys
    of the official code are random and could be matched). Prompts and keys start uniform in [-1, 1].

    Args:
        backbone / in_channels / pretrained / schedule / first_task / mask_old_logits: see ``PromptModule``.
        g_length / g_layers: G-prompt length and blocks.
        e_length / e_layers: E-prompt length and blocks.
        pool_size: E-prompts (at least the stream's tasks).
        pull_weight: weight of the key-query similarity term.
    """

    paper_weights = ("vit_base_patch16_224.augreg_in21k", "vit_base_patch16_224.orig_in21k")

    def __init__(
        self,
        backbone: BackboneSpec = "timm:vit_base_patch16_224.augreg_in21k",
        in_channels: int = 3,
        schedule: TaskSchedule | None = None,
        first_task: TaskSchedule | None = None,
        pretrained: str | None = "hub",
        mask_old_logits: bool = True,
        g_length: int = 5,
        g_layers: list[int] | None = None,
        e_length: int = 5,
        e_layers: list[int] | None = None,
        pool_size: int = 10,
        pull_weight: float = 1.0,
    ) -> None:
        super().__init__(backbone, in_channels, schedule, first_task, pretrained, mask_old_logits)
        g_layers = [0, 1] if g_layers is None else list(g_layers)
        e_layers = [2, 3, 4] if e_layers is None else list(e_layers)
        depth = len(self.backbone.blocks)
        bad = [layer for layer in g_layers + e_layers if not 0 <= layer < depth]
        if bad or set(g_layers) & set(e_layers):
            raise ValueError(f"g_layers={g_layers} and e_layers={e_layers} must be distinct blocks in 0..{depth - 1}.")
        self.g_layers, self.e_layers = g_layers, e_layers
        # [layer, key/value, length, dim]
        self.g_prompt = nn.Parameter(torch.empty(len(g_layers), 2, g_length, self.dim).uniform_(-1, 1))
        self.e_prompts = nn.Parameter(torch.empty(pool_size, len(e_layers), 2, e_length, self.dim).uniform_(-1, 1))
        self.e_keys = nn.Parameter(torch.empty(pool_size, self.dim).uniform_(-1, 1))

    def on_task_start(self, task: TaskInfo) -> None:
        if task.num_tasks > self.hparams.pool_size:
            raise ValueError(
                f"DualPrompt keeps one E-prompt per task: the stream has {task.num_tasks} tasks but pool_size="
                f"{self.hparams.pool_size}; set model.init_args.pool_size to at least {task.num_tasks}."
            )
        super().on_task_start(task)
        if task.index > 0:
            with torch.no_grad():
                self.e_prompts[task.index] = self.e_prompts[task.index - 1]
                self.e_keys[task.index] = self.e_keys[task.index - 1]

    def prompt_features(self, images: Tensor, query: Tensor) -> tuple[Tensor, Tensor | None]:
        batch = len(images)
        keys = F.normalize(self.e_keys[: self.task_index + 1].float(), dim=1)
        similarity = F.normalize(query.float(), dim=1) @ keys.T  # [B, seen tasks]
        if self.training:
            chosen = torch.full((batch,), self.task_index, device=images.device, dtype=torch.long)
            pull = -self.hparams.pull_weight * similarity[:, self.task_index].sum() / batch
        else:
            chosen, pull = similarity.argmax(dim=1), None
        prefixes = {}
        for i, layer in enumerate(self.g_layers):
            prefixes[layer] = (self.g_prompt[i, 0].expand(batch, -1, -1), self.g_prompt[i, 1].expand(batch, -1, -1))
        expert = self.e_prompts[chosen]  # [B, layers, 2, length, D]
        for i, layer in enumerate(self.e_layers):
            prefixes[layer] = (expert[:, i, 0], expert[:, i, 1])
        return prompted_tokens(self.backbone, images, prefixes=prefixes)[:, 0], pull

    def architecture(self) -> dict[str, Any]:
        return {**super().architecture(), "g_layers": self.g_layers, "e_layers": self.e_layers}
