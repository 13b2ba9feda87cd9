"""EWC: elastic weight consolidation (Kirkpatrick et al., PNAS 2017), in its class-incremental form."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_cil.data.scenario import TaskInfo
from lightning_cil.methods.base import IncrementalModule, TaskSchedule
from lightning_cil.networks.backbones import BackboneSpec
from lightning_cil.precision import full_precision

__all__ = ["EWC"]


class EWC(IncrementalModule):
    """EWC: a quadratic penalty keeps the parameters important to earlier tasks near their old values.

    - After each task the diagonal Fisher information F of every parameter is estimated from squared gradients
      of the cross-entropy on the task's training data (one mean gradient per batch, in eval mode so BatchNorm
      statistics do not move), capped at ``fisher_max`` (PyCIL's 1e-4; None: no cap).
    - Loss = CE over the new classes' logits + ``ewc_lambda`` / 2 * sum F (theta - theta*)^2. Classifier rows
      that grew later are compared on the rows that existed.
    - ``online: true`` keeps one penalty with theta* <- theta_t and, by default, PyCIL's convex mix
      F <- alpha F + (1 - alpha) F_t, alpha = old / seen classes at the task's end, so the Fisher keeps the scale
      of one task's. With a ``gamma``, F <- gamma F + F_t instead (online EWC of Schwarz et al. 2018, whose
      Fisher grows with the tasks). ``online: false`` keeps one (F_t, theta*_t) penalty per finished task (the
      original EWC). Classifier rows that grew in the task take F_t alone.

    Under DDP the Fisher is averaged over ranks, so every rank holds the same penalty.

    Args:
        ewc_lambda: penalty weight (PyCIL: 1000).
        online: accumulate one penalty instead of one per task.
        gamma: None (PyCIL's convex mix), or the decay of Schwarz et al.'s accumulated Fisher (online only).
        fisher_max: cap on each Fisher entry.
    """

    def __init__(
        self,
        backbone: BackboneSpec = "resnet32",
        in_channels: int = 3,
        schedule: TaskSchedule | None = None,
        first_task: TaskSchedule | None = None,
        pretrained: str | None = None,
        ewc_lambda: float = 1000.0,
        online: bool = True,
        gamma: float | None = None,
        fisher_max: float | None = 1e-4,
    ) -> None:
        super().__init__(backbone, in_channels, schedule, first_task, pretrained)
        if ewc_lambda < 0 or (gamma is not None and not 0 < gamma <= 1):
            raise ValueError(f"ewc_lambda={ewc_lambda} must be >= 0 and gamma={gamma} None or in (0, 1].")
        #: one entry per penalty: {parameter name: (fisher, old value)}
        self.penalties: list[dict[str, tuple[Tensor, Tensor]]] = []
        self.num_old_classes = 0

    def on_task_start(self, task: TaskInfo) -> None:
        self.num_old_classes = task.num_old_classes
        super().on_task_start(task)

    def training_loss(self, logits: Tensor, labels: Tensor, images: Tensor) -> Tensor:
        old = self.num_old_classes
        loss = F.cross_entropy(logits[:, old:], labels - old) if old else F.cross_entropy(logits, labels)
        if self.penalties:
            loss = loss + self.hparams.ewc_lambda / 2 * self.penalty()
        return loss

    def penalty(self) -> Tensor:
        params = dict(self.named_parameters())
        total = torch.zeros((), device=self.head.weight.device)
        for penalty in self.penalties:
            for name, (fisher, old) in penalty.items():
                current = params[name][: len(old)]
                fisher, old = fisher.to(current.device), old.to(current.device)  # no-op once on the device
                total = total + (fisher * (current - old) ** 2).sum()
        return total

    @torch.enable_grad()
    def on_task_end(self, task: TaskInfo) -> None:
        fisher = self._fisher()
        values = {n: p.detach().clone() for n, p in self.named_parameters() if n in fisher}
        if self.hparams.online and self.penalties:
            previous, gamma = self.penalties[0], self.hparams.gamma
            alpha = (task.num_seen_classes - len(task.new_classes)) / task.num_seen_classes
            for name in fisher:
                if name in previous:
                    old, rows = previous[name][0], len(previous[name][0])
                    if gamma is None:
                        fisher[name][:rows] = alpha * old + (1 - alpha) * fisher[name][:rows]
                    else:
                        fisher[name][:rows] += gamma * old
            self.penalties = [{n: (fisher[n], values[n]) for n in fisher}]
        else:
            self.penalties.append({n: (fisher[n], values[n]) for n in fisher})

    def _fisher(self) -> dict[str, Tensor]:
        """Mean squared batch gradient of the cross-entropy on the task's training data, per parameter.

        Computed in full precision even under autocast: squared fp16 gradients without a loss scale underflow.
        """
        trainer, data = self.trainer, self.task_data
        device = data.device
        loader = data.shard_loader(data.training_set(), data.batch_size)
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        was_training = self.training
        self.eval()
        batches = 0
        with full_precision(device.type):
            for images, labels, tasks in loader:
                images, labels, tasks = images.to(device), labels.to(device), tasks.to(device)
                self.zero_grad()
                F.cross_entropy(self.restrict_to_tasks(self(images), tasks), labels).backward()
                for name, p in params.items():
                    if p.grad is not None:
                        fisher[name] += p.grad.detach() ** 2
                batches += 1
        self.zero_grad()
        self.train(was_training)
        flat = torch.cat([f.flatten() for f in fisher.values()]) / max(batches, 1)
        if trainer.world_size > 1:
            flat = trainer.strategy.reduce(flat, reduce_op="mean")
        if self.hparams.fisher_max is not None:
            flat = flat.clamp(max=self.hparams.fisher_max)
        out, offset = {}, 0
        for name, f in fisher.items():
            out[name] = flat[offset : offset + f.numel()].view_as(f)
            offset += f.numel()
        return out

    def architecture(self) -> dict[str, Any]:
        penalties = [{n: (f.cpu(), v.cpu()) for n, (f, v) in p.items()} for p in self.penalties]
        return {**super().architecture(), "penalties": penalties, "num_old_classes": self.num_old_classes}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        arch = checkpoint["lightning_cil"]
        device = self.head.weight.device
        self.penalties = [{n: (f.to(device), v.to(device)) for n, (f, v) in p.items()} for p in arch["penalties"]]
        self.num_old_classes = arch["num_old_classes"]
