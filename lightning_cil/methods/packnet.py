"""PackNet (Mallya and Lazebnik, CVPR 2018): iterative magnitude pruning packs tasks into one network."""

from __future__ import annotations

import torch

from lightning_cil.data.scenario import TaskInfo
from lightning_cil.methods.base import TaskSchedule
from lightning_cil.methods.masking import TaskMaskedModule
from lightning_cil.networks.weight_masks import PackNetWeight, attach, masked_layers

__all__ = ["PackNet"]

#: owner codes are stored in one byte per weight (0 = free)
MAX_TASKS = 255


class PackNet(TaskMaskedModule):
    """PackNet: every conv/linear weight belongs to one task (an owner map, one byte per weight).

    - Task t trains the free weights (those no earlier task kept); the weights of tasks < t are used frozen.
    - ``retrain_epochs`` before the end of the task's epochs, ``prune_fraction`` of the free weights with the
      smallest magnitude in each layer are zeroed and released; the rest become task t's and retrain alone.
      The last task of the stream is not pruned: it keeps every free weight.
    - At test time for task t only weights owned by tasks <= t are used (later tasks' weights are zero).
    - BatchNorm keeps the pretrained statistics and parameters; biases of masked layers are frozen too
      (the paper frees them only for the first task, which here is the pretraining).

    Args:
        pretrained: see :class:`TaskMaskedModule`.
        prune_fraction: share of the task's free weights released per layer (0.75 in the official sequence).
        retrain_epochs: the last epochs of each task, after pruning, that retrain the kept weights (10).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        in_channels: int = 3,
        schedule: TaskSchedule | None = None,
        first_task: TaskSchedule | None = None,
        pretrained: str | None = None,
        prune_fraction: float = 0.75,
        retrain_epochs: int = 10,
    ) -> None:
        super().__init__(backbone, in_channels, schedule, first_task, pretrained)
        if not 0 <= prune_fraction < 1:
            raise ValueError(f"prune_fraction={prune_fraction} must be in [0, 1).")
        for task, plan in enumerate([first_task or self.schedule, self.schedule]):
            if not 0 < retrain_epochs < plan.epochs:
                raise ValueError(
                    f"retrain_epochs={retrain_epochs} must be between 1 and the task's epochs - 1 "
                    f"({'first_task' if task == 0 else 'schedule'}.epochs={plan.epochs})."
                )
        self.weights = attach(self.backbone, PackNetWeight)
        for _, layer in masked_layers(self.backbone):
            layer.parametrizations.weight.original.requires_grad_(True)

    def on_task_start(self, task: TaskInfo) -> None:
        if task.index + 1 > MAX_TASKS:
            raise ValueError(f"PackNet's owner map holds at most {MAX_TASKS} tasks; task {task.index} is one too many.")
        super().on_task_start(task)

    def _owner_code(self) -> int:
        return self.task_index + 1

    def _pruned(self) -> bool:
        return any(bool((w.owner == self._owner_code()).any()) for w in self.weights)

    def activate(self, task: int, training: bool = False) -> None:
        for w in self.weights:
            if training:
                w.visible, w.trainable = task, (task + 1 if self._pruned() else 0)
            else:
                w.visible, w.trainable = task + 1, None
        self.active_task = task
        self._set_batchnorm_mode(self.training)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        schedule = self.schedule_for_task(self.task_index)
        first_epoch = self.trainer.fit_loop.max_epochs - schedule.epochs
        last_task = self.task_index == self.num_tasks - 1
        if self.trainer.current_epoch - first_epoch == schedule.epochs - self.hparams.retrain_epochs and not last_task:
            self._prune()

    @torch.no_grad()
    def _prune(self) -> None:
        """Release the smallest ``prune_fraction`` of each layer's free weights; the rest become this task's."""
        code = self._owner_code()
        for (_, layer), w in zip(masked_layers(self.backbone), self.weights):
            weight = layer.parametrizations.weight.original
            free = w.owner == 0
            magnitudes = weight[free].abs()
            release = int(self.hparams.prune_fraction * len(magnitudes))
            keep = torch.ones_like(magnitudes, dtype=torch.bool)
            if release:
                keep[torch.argsort(magnitudes, stable=True)[:release]] = False
            owner = w.owner[free]
            owner[keep] = code
            w.owner[free] = owner
            weight[free & (w.owner == 0)] = 0.0  # released weights restart from zero in later tasks
        self.activate(self.task_index, training=True)

    @torch.no_grad()
    def on_task_end(self, task: TaskInfo) -> None:
        code = self._owner_code()
        for (_, layer), w in zip(masked_layers(self.backbone), self.weights):
            if task.index == task.num_tasks - 1:
                w.owner[w.owner == 0] = code  # the last task keeps every free weight
            mine = w.owner == code
            w.frozen[mine] = layer.parametrizations.weight.original[mine].to(w.frozen.dtype)
        self.activate(task.index)

    def owner_counts(self) -> dict[int, int]:
        """Weights per owner code (0 = free), over all masked layers."""
        counts = torch.bincount(torch.cat([w.owner.flatten() for w in self.weights]).long())
        return {code: int(n) for code, n in enumerate(counts.tolist()) if n}
