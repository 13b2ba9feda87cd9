"""PackNet (Mallya and Lazebnik, CVPR 2018): iterative magnitude pruning packs tasks into one network."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lightning_cil.data.scenario import TaskInfo
from lightning_cil.methods.base import TaskSchedule
from lightning_cil.methods.masking import TaskMaskedModule
from lightning_cil.networks.backbones import BackboneSpec
from lightning_cil.networks.weight_masks import PackNetWeight, attach, masked_layers

__all__ = ["PackNet"]

#: owner codes are stored in one byte per weight (0 = free)
MAX_CODE = 255
#: the owner code of the pretrained weights PackNet keeps (the paper's first task)
PRETRAINED = 1


class PackNet(TaskMaskedModule):
    """PackNet: every conv/linear weight belongs to one task (an owner map, one byte per weight).

    - The pretrained network is the first task, as in the paper (there, ImageNet): before the stream's first
      task the ``pretrained_prune_fraction`` of each layer's pretrained weights with the smallest magnitude are
      zeroed and released (0.5, the official ImageNet step); the rest stay frozen and are used by every task.
    - Each task of the stream has two phases, two fits: it trains the free weights (the weights of earlier tasks
      and of the pretraining are used frozen) for its epochs but ``retrain_epochs``; between the fits
      (:meth:`on_phase_end`) ``prune_fraction`` of the free weights with the smallest magnitude in each layer
      are zeroed and released, and the rest become the task's; the second fit retrains them alone, with a
      fresh optimizer (the paper's separate retraining run) that goes on with the task's learning-rate
      schedule where the first fit stopped. The last task of the stream is not pruned: one fit, and it keeps
      every free weight.
    - At test time for task t only weights owned by the pretraining and tasks <= t are used (later tasks'
      weights are zero).
    - BatchNorm keeps the pretrained statistics and parameters; biases of masked layers are frozen too
      (the paper trains them only for its first task, the pretraining).

    Deviations: the paper retrains the pretrained network on its own data (ImageNet, 10 epochs) after pruning
    it; that data is not part of the stream, so the kept pretrained weights are used as they are. Without
    ``pretrained`` (random weights) there is no pretraining task: every weight starts free for the first task.

    Args:
        pretrained: see :class:`TaskMaskedModule`.
        prune_fraction: share of the task's free weights released per layer (0.75 in the official sequence).
        retrain_epochs: the last epochs of each task, after pruning, that retrain the kept weights (10).
        pretrained_prune_fraction: share of each layer's pretrained weights released for the stream's tasks (0.5).
    """

    def __init__(
        self,
        backbone: BackboneSpec = "resnet18",
        in_channels: int = 3,
        schedule: TaskSchedule | None = None,
        first_task: TaskSchedule | None = None,
        pretrained: str | None = None,
        prune_fraction: float = 0.75,
        retrain_epochs: int = 10,
        pretrained_prune_fraction: float = 0.5,
    ) -> None:
        super().__init__(backbone, in_channels, schedule, first_task, pretrained)
        if not 0 <= prune_fraction < 1:
            raise ValueError(f"prune_fraction={prune_fraction} must be in [0, 1).")
        if not 0 < pretrained_prune_fraction < 1:
            raise ValueError(f"pretrained_prune_fraction={pretrained_prune_fraction} must be in (0, 1).")
        for task, plan in enumerate([first_task or self.schedule, self.schedule]):
            if not 0 < retrain_epochs < plan.epochs:
                raise ValueError(
                    f"retrain_epochs={retrain_epochs} must be between 1 and the task's epochs - 1 "
                    f"({'first_task' if task == 0 else 'schedule'}.epochs={plan.epochs})."
                )
        self.weights = attach(self.backbone, PackNetWeight)
        for _, layer in masked_layers(self.backbone):
            layer.parametrizations.weight.original.requires_grad_(True)
        #: the pretrained weights that were kept own code 1 (then task t owns t + 2)
        self.keeps_pretrained = pretrained is not None
        if self.keeps_pretrained:
            self._release(PRETRAINED, pretrained_prune_fraction)

    def on_task_start(self, task: TaskInfo) -> None:
        if self._code(task.index) > MAX_CODE:
            raise ValueError(
                f"PackNet's owner map holds at most {MAX_CODE - int(self.keeps_pretrained)} tasks; task {task.index} "
                f"is one too many."
            )
        super().on_task_start(task)

    def _code(self, task: int) -> int:
        return task + 1 + int(self.keeps_pretrained)

    def _owner_code(self) -> int:
        return self._code(self.task_index)

    def _pruned(self) -> bool:
        return any(bool((w.owner == self._owner_code()).any()) for w in self.weights)

    def activate(self, task: int, training: bool = False) -> None:
        code = self._code(task)
        for w in self.weights:
            if training:
                w.visible, w.trainable = code - 1, (code if self._pruned() else 0)
            else:
                w.visible, w.trainable = code, None
        self.active_task = task
        self._set_batchnorm_mode(self.training)

    # ------------------------------------------------------------------ the two phases of a task

    def task_phases(self, task: TaskInfo) -> list[int]:
        epochs = self.schedule_for_task(task.index).epochs
        return [epochs] if task.is_last else [epochs - self.hparams.retrain_epochs, self.hparams.retrain_epochs]

    def on_phase_end(self, task: TaskInfo, phase: int) -> None:
        self._prune()

    def configure_optimizers(self) -> dict[str, Any]:
        config = super().configure_optimizers()
        if self.learning and self._pruned():
            # the retraining fit goes on with the task's learning-rate schedule where the training fit stopped
            scheduler = config["lr_scheduler"]["scheduler"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # stepping before any optimizer step, on purpose
                for _ in range(self.schedule_for_task(self.task_index).epochs - self.hparams.retrain_epochs):
                    scheduler.step()
        return config

    @torch.no_grad()
    def _prune(self) -> None:
        """Release the smallest ``prune_fraction`` of each layer's free weights; the rest become this task's."""
        self._release(self._owner_code(), self.hparams.prune_fraction)
        self.activate(self.task_index, training=True)

    @torch.no_grad()
    def _release(self, code: int, fraction: float) -> None:
        """In each layer, the free weights but the smallest ``fraction`` by magnitude become ``code``'s, frozen as
        they are; the released ones are zeroed (they restart from zero in later tasks)."""
        for (_, layer), w in zip(masked_layers(self.backbone), self.weights):
            weight = layer.parametrizations.weight.original
            free = w.owner == 0
            magnitudes = weight[free].abs()
            release = int(fraction * len(magnitudes))
            keep = torch.ones_like(magnitudes, dtype=torch.bool)
            if release:
                keep[torch.argsort(magnitudes, stable=True)[:release]] = False
            owner = w.owner[free]
            owner[keep] = code
            w.owner[free] = owner
            weight[free & (w.owner == 0)] = 0.0
            w.frozen[w.owner == code] = weight[w.owner == code].to(w.frozen.dtype)

    @torch.no_grad()
    def on_task_end(self, task: TaskInfo) -> None:
        code = self._owner_code()
        for (_, layer), w in zip(masked_layers(self.backbone), self.weights):
            if task.index == task.num_tasks - 1:
                w.owner[w.owner == 0] = code  # the last task keeps every free weight
            mine = w.owner == code
            w.frozen[mine] = layer.parametrizations.weight.original[mine].to(w.frozen.dtype)
        self.learning = False
        self.activate(task.index)

    def architecture(self) -> dict[str, Any]:
        return {**super().architecture(), "keeps_pretrained": self.keeps_pretrained}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the owner codes depend on it: a checkpoint says which numbering its owner map uses
        self.keeps_pretrained = bool(checkpoint["lightning_cil"].get("keeps_pretrained", False))
        super().on_load_checkpoint(checkpoint)

    def owner_counts(self) -> dict[int, int]:
        """Weights per owner code (0 = free; 1 = the kept pretrained weights, if any), over all masked layers."""
        counts = torch.bincount(torch.cat([w.owner.flatten() for w in self.weights]).long())
        return {code: int(n) for code, n in enumerate(counts.tolist()) if n}
