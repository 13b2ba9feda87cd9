"""The shared part of Piggyback and PackNet: one frozen backbone, per-task weight masks, a task id at test time."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_cil.data.scenario import TaskInfo
from lightning_cil.methods.base import IncrementalModule, TaskSchedule
from lightning_cil.networks.backbones import BackboneSpec
from lightning_cil.networks.heads import TaskHeads

__all__ = ["TaskMaskedModule"]


class TaskMaskedModule(IncrementalModule):
    """A backbone whose weights are shared by all tasks through per-task masks; one head per task.

    Subclasses attach their masks in ``__init__`` and implement :meth:`activate`, which makes the network
    compute task ``t``'s function. Evaluation splits each batch by task id and activates each task in turn, so
    earlier tasks are scored by exactly the network they finished with; then the task being learned (if any) is
    activated for training again, so an evaluation inside a fit (validation, Lightning's sanity check) does not
    stop the training. BatchNorm keeps the pretrained statistics (eval mode) unless a subclass trains
    task-specific BatchNorm.

    Args:
        backbone / in_channels / schedule / first_task / pretrained: as for every method.
        pretrained: backbone weights (see :class:`IncrementalModule`); also ``torchvision:<Weights>`` (e.g.
            ``torchvision:ResNet18_Weights.IMAGENET1K_V1``, downloads) for the registered ResNets.
    """

    def __init__(
        self,
        backbone: BackboneSpec = "resnet18",
        in_channels: int = 3,
        schedule: TaskSchedule | None = None,
        first_task: TaskSchedule | None = None,
        pretrained: str | None = None,
    ) -> None:
        super().__init__(backbone, in_channels, schedule, first_task, pretrained)
        self.backbone.requires_grad_(False)
        self.head = TaskHeads(self.backbone.out_dim)
        self.active_task = -1
        #: a task is being learned: from its start to its end (subclasses clear it in ``on_task_end``)
        self.learning = False

    # ------------------------------------------------------------------ tasks

    def on_task_start(self, task: TaskInfo) -> None:
        if task.scenario != "task":
            raise ValueError(
                f"{type(self).__name__} needs the task id at test time: set data.scenario: task "
                f"(got {task.scenario!r})."
            )
        super().on_task_start(task)
        self.learning = True
        self.activate(task.index, training=True)

    def activate(self, task: int, training: bool = False) -> None:
        """Make the network compute task ``task`` (``training``: the task being learned)."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> TaskMaskedModule:
        super().train(mode)
        self._set_batchnorm_mode(mode)
        return self

    def on_train_start(self) -> None:
        # a resumed fit loads the state dict (owner maps, masks) after ``on_load_checkpoint`` activated the task:
        # activate it again on what was loaded
        self.activate(self.task_index, training=self.learning)

    def on_train_epoch_start(self) -> None:
        # Lightning may switch submodules back to train mode one by one (restoring the modes it saw before an
        # evaluation); frozen BatchNorm must not update its statistics, so its mode is set again here.
        self._set_batchnorm_mode(True)

    def _set_batchnorm_mode(self, mode: bool) -> None:
        for module in self.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()  # pretrained statistics stay

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self, batch: tuple[Tensor, ...]) -> None:
        images, labels, tasks, *_ = batch
        if len(tasks) and int(tasks.max()) > self.task_index:
            raise ValueError(
                f"task id {int(tasks.max())} is out of range: this model has learned tasks 0..{self.task_index}."
            )
        scores = torch.full((len(images), self.head.out_features), torch.finfo(torch.float32).min, device=images.device)
        for task in tasks.unique().tolist():
            rows = tasks == task
            self.activate(task)
            scores[rows] = self(images[rows]).float()
        self.activate(self.task_index, training=self.learning)
        self.eval_metrics["cnn"].update(self.restrict_to_tasks(scores, tasks), labels, tasks)

    def architecture(self) -> dict[str, Any]:
        return {
            **super().architecture(),
            "task_heads": [h.out_features for h in self.head.heads],
            "learning": self.learning,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for size in checkpoint["lightning_cil"]["task_heads"]:
            self.head.expand(self.head.out_features + size)
        super().on_load_checkpoint(checkpoint)
        self._check_backbone_shapes(checkpoint["state_dict"])
        self.learning = bool(checkpoint["lightning_cil"].get("learning", False))  # a mid-task checkpoint: True
        self.activate(self.task_index, training=self.learning)

    def _check_backbone_shapes(self, state: dict[str, Tensor]) -> None:
        """Masks and owner maps must fit this backbone weight for weight; refuse those made for another one."""
        mine = self.state_dict()
        for key, value in state.items():
            if key.startswith("backbone.") and key in mine and not key.endswith(".scores"):
                if value.shape != mine[key].shape:
                    raise ValueError(
                        f"the checkpoint's {key} has shape {tuple(value.shape)} but this backbone's has "
                        f"{tuple(mine[key].shape)}: its masks were made for another architecture."
                    )
