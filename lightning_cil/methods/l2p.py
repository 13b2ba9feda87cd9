"""L2P (Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_cil.methods.prompting import PromptModule
from lightning_cil.methods.schedule import TaskSchedule
from lightning_cil.networks.backbones import BackboneSpec
from lightning_cil.networks.vit_prompts import prompted_tokens

__all__ = ["L2P"]


class L2P(PromptModule):
    """A pool of prompts with keys, chosen per image by the query; the chosen prompts are prepended to the frozen
    ViT's input tokens and the head reads the mean of their outputs.

    - Pool of ``pool_size`` (10) prompts of ``prompt_length`` (5) tokens, one key each; the ``top_k`` (5) keys of
      highest cosine similarity to the query select the prompts (no task id, at training or test time).
    - Loss: cross-entropy over the seen classes with the old classes' logits masked, minus ``pull_weight`` (0.1)
      times the summed similarity of the chosen keys to the query per image (it pulls the keys toward the queries).
    - Trained: prompts, keys and the linear head; the optimizer is rebuilt at every task, the LR is constant
      (paper: Adam lr 0.03, batch 128, 5 epochs on CIFAR, gradient clipping 1.0 in the trainer).

    Deviations: prompts and keys start uniform in [-1, 1] (the official ``uniform`` init); the prompts enter after
    the position embedding (no positions of their own: the official code extends the position embedding for them);
    ``batchwise_prompt`` (the majority vote over a batch, which makes a test prediction depend on its batch) is
    not offered: every image picks its own prompts.

    Args:
        backbone / in_channels / pretrained / schedule / first_task / mask_old_logits: see ``PromptModule``.
        pool_size: prompts in the pool (M, 10).
        top_k: prompts chosen per image (N, 5).
        prompt_length: tokens per prompt (L_p, 5).
        pull_weight: weight of the key-query similarity term (lambda, 0.1).
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
        pool_size: int = 10,
        top_k: int = 5,
        prompt_length: int = 5,
        pull_weight: float = 0.1,
    ) -> None:
        super().__init__(backbone, in_channels, schedule, first_task, pretrained, mask_old_logits)
        if not 1 <= top_k <= pool_size:
            raise ValueError(f"top_k={top_k} must be in 1..pool_size={pool_size}.")
        if prompt_length < 1:
            raise ValueError(f"prompt_length={prompt_length} must be at least 1.")
        self.prompts = nn.Parameter(torch.empty(pool_size, prompt_length, self.dim).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(pool_size, self.dim).uniform_(-1, 1))

    def prompt_features(self, images: Tensor, query: Tensor) -> tuple[Tensor, Tensor | None]:
        similarity = F.normalize(query.float(), dim=1) @ F.normalize(self.keys.float(), dim=1).T  # [B, M]
        chosen_similarity, chosen = similarity.topk(self.hparams.top_k, dim=1)
        prompts = self.prompts[chosen].flatten(1, 2)  # [B, N * L_p, D]
        tokens = prompted_tokens(self.backbone, images, prompts=prompts)
        features = tokens[:, 1 : 1 + prompts.shape[1]].mean(dim=1)
        pull = -self.hparams.pull_weight * chosen_similarity.sum() / len(images)
        return features, pull
