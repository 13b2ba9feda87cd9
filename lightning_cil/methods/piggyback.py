"""Piggyback (Mallya, Davis and Lazebnik, ECCV 2018): learned binary weight masks on a frozen network."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_cil.data.scenario import TaskInfo
from lightning_cil.methods.base import TaskSchedule
from lightning_cil.methods.masking import TaskMaskedModule
from lightning_cil.networks.backbones import BackboneSpec
from lightning_cil.networks.weight_masks import (
    PiggybackMask,
    attach,
    mask_bytes,
    masked_layers,
    pack_bits,
    unpack_bits,
)

__all__ = ["Piggyback"]


def _batchnorms(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class Piggyback(TaskMaskedModule):
    """Piggyback: the pretrained backbone is frozen; each task learns a binary mask over every conv/linear weight.

    - Every weight has a real-valued score (``mask_init`` = 1e-2); the forward pass uses
      ``weight * (score > mask_threshold)`` (5e-3) and the gradient passes straight through the threshold.
      Only the scores, the task's head and (``task_batchnorm``) the task's BatchNorm train.
    - At the task end the mask is packed to 1 bit per weight (``task_masks``, ceil(n/8) bytes per task) and the
      scores are dropped; switching the active task switches mask, BatchNorm and head.
    - ``train_masks: false`` is the paper's "classifier only" baseline: the frozen backbone with a new head.

    Deviation: none in the algorithm. Evaluation uses the known task id (task-incremental only).

    Args:
        pretrained: see :class:`TaskMaskedModule`.
        train_masks: learn masks (false: classifier-only baseline).
        task_batchnorm: train BatchNorm parameters and statistics per task (the paper's ablation).
        mask_init: initial score of every weight.
        mask_threshold: scores above it keep their weight.
        mask_lr: learning rate of the scores (null: the schedule's lr, which the head and BatchNorm use). The
            official code has one rate for each (both 1e-4 for 30 epochs). On short runs the head needs a larger
            rate than the scores: with Adam every score moves by about the learning rate per step, so a large rate
            flips many weights on gradient noise alone.
    """

    def __init__(
        self,
        backbone: BackboneSpec = "resnet18",
        in_channels: int = 3,
        schedule: TaskSchedule | None = None,
        first_task: TaskSchedule | None = None,
        pretrained: str | None = None,
        train_masks: bool = True,
        task_batchnorm: bool = False,
        mask_init: float = 1e-2,
        mask_threshold: float = 5e-3,
        mask_lr: float | None = None,
    ) -> None:
        super().__init__(backbone, in_channels, schedule, first_task, pretrained)
        if mask_lr is not None and mask_lr <= 0:
            raise ValueError(f"mask_lr={mask_lr} must be positive (or null: the schedule's lr).")
        self.masks = attach(self.backbone, lambda w: PiggybackMask(w.shape, mask_init, mask_threshold))
        self.register_buffer("task_masks", torch.zeros(0, mask_bytes(self.masks), dtype=torch.uint8))
        self.batchnorms = _batchnorms(self.backbone)
        self.register_buffer("pretrained_batchnorm", self._batchnorm_state())
        self.register_buffer("task_batchnorm_bank", torch.zeros(0, len(self.pretrained_batchnorm)))
        self._training_batchnorm: torch.Tensor | None = None

    # ------------------------------------------------------------------ BatchNorm per task

    def _batchnorm_state(self) -> torch.Tensor:
        parts = [
            t.detach().flatten()
            for bn in self.batchnorms
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)
        ]
        return torch.cat(parts).float() if parts else torch.zeros(0)

    @torch.no_grad()
    def _load_batchnorm(self, state: torch.Tensor) -> None:
        offset = 0
        for bn in self.batchnorms:
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t.copy_(state[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def _set_batchnorm_mode(self, mode: bool) -> None:
        training_task = self.active_task >= len(self.task_masks)
        for bn in self.batchnorms:
            bn.train(mode and self.hparams.task_batchnorm and training_task)

    # ------------------------------------------------------------------ tasks

    def on_task_start(self, task: TaskInfo) -> None:
        for mask in self.masks:
            mask.scores = nn.Parameter(
                torch.full(mask.fixed_shape, self.hparams.mask_init, device=self.task_masks.device),
                requires_grad=self.hparams.train_masks,
            )
        if self.hparams.task_batchnorm:
            self._load_batchnorm(self.pretrained_batchnorm)
            for bn in self.batchnorms:
                bn.requires_grad_(True)
        super().on_task_start(task)

    def on_task_end(self, task: TaskInfo) -> None:
        bits = torch.cat([mask.binary().flatten() for mask in self.masks])
        self.task_masks = torch.cat([self.task_masks, pack_bits(bits)[None]])
        self.task_batchnorm_bank = torch.cat(
            [self.task_batchnorm_bank, self._batchnorm_state()[None].to(self.task_batchnorm_bank)]
        )
        for bn in self.batchnorms:
            bn.requires_grad_(False)
        for mask in self.masks:  # the scores are not needed any more: only the packed bits are kept
            mask.scores = nn.Parameter(torch.zeros(0, device=self.task_masks.device), requires_grad=False)
        self.learning = False
        self.activate(task.index)

    def activate(self, task: int, training: bool = False) -> None:
        finished = len(self.task_masks)
        leaving_training = self.active_task >= finished and task < finished
        if leaving_training and self.hparams.task_batchnorm:
            self._training_batchnorm = self._batchnorm_state()
        if task >= finished:  # the task being learned: the scores decide, BatchNorm as it trains
            for mask in self.masks:
                mask.fixed = None
            if self._training_batchnorm is not None:
                self._load_batchnorm(self._training_batchnorm)
                self._training_batchnorm = None
        else:
            bits = unpack_bits(self.task_masks[task], sum(m.numel_weights for m in self.masks))
            offset = 0
            for mask in self.masks:
                mask.fixed = bits[offset : offset + mask.numel_weights]
                offset += mask.numel_weights
            if self.hparams.task_batchnorm:
                self._load_batchnorm(self.task_batchnorm_bank[task])
        self.active_task = task
        self._set_batchnorm_mode(self.training)

    def parameter_groups(self) -> list[dict[str, Any]]:
        scores = [m.scores for m in self.masks if m.scores.requires_grad]
        ids = {id(p) for p in scores}
        others = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        lr = self.hparams.mask_lr
        return [{"params": others}] + ([{"params": scores} | ({"lr": lr} if lr is not None else {})] if scores else [])

    # ------------------------------------------------------------------ checkpoints

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint_identity(checkpoint)  # another backbone: say so, not just that the masks differ
        state = checkpoint["state_dict"]
        expected = self.task_masks.shape[1]
        if state["task_masks"].shape[1:] != (expected,):
            raise ValueError(
                f"the checkpoint's task masks hold {tuple(state['task_masks'].shape[1:])} bytes per task but this "
                f"backbone needs {expected}: the masks were made for another architecture."
            )
        self.task_masks = torch.zeros_like(state["task_masks"])
        self.task_batchnorm_bank = torch.zeros_like(state["task_batchnorm_bank"])
        for i, mask in enumerate(self.masks):
            key = next(
                k for k in state if k.endswith(".scores") and k.split(".parametrizations")[0] == self._mask_paths[i]
            )
            mask.scores = nn.Parameter(torch.zeros_like(state[key]), requires_grad=state[key].numel() > 0)
        super().on_load_checkpoint(checkpoint)

    @property
    def _mask_paths(self) -> list[str]:
        return [f"backbone.{name}" for name, _ in masked_layers(self.backbone)]
