"""BiC: bias correction (Wu et al., CVPR 2019)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_cil.data.memory import Selection
from lightning_cil.data.scenario import TaskInfo
from lightning_cil.methods.base import TaskSchedule
from lightning_cil.methods.distillation import DistillationModule
from lightning_cil.methods.rehearsal import RehearsalModule
from lightning_cil.networks.backbones import BackboneSpec
from lightning_cil.precision import full_precision

__all__ = ["BiC"]


class BiC(RehearsalModule, DistillationModule):
    """BiC: rehearsal + distillation, then a two-parameter linear layer corrects the new classes' logits.

    - From the second task on, a held-out split is taken before training: a random ``val_ratio`` of each old
      class's exemplars (at least one) and as many random samples of each new class (PyCIL's split). The data
      module leaves it out of training.
    - Stage 1 loss = (1 - lambda) CE + lambda KD(old logits, teacher, T), lambda = old / seen classes (PyCIL).
    - Stage 2 (task end): with the network frozen, the task's bias layer q = alpha * o + beta on its new classes'
      logits o is trained on the held-out split (cross-entropy over all seen classes; alpha = 1, beta = 0 at
      start). Earlier tasks' layers stay applied to their own classes at inference.
    - Then the memory is rebuilt by herding (the held-out samples take part again).

    Deviation: the held-out logits are computed once (the network is frozen in stage 2), and the stage-2
    optimiser (``bias_epochs`` of SGD at ``bias_lr``, full batch) is this implementation's choice: neither the
    paper nor PyCIL's config is in the reference.

    Args:
        memory_budget / memory_per_class / selection: the exemplar memory (2,000, herding).
        temperature: distillation temperature (2).
        val_ratio: share of the exemplars held out per class for stage 2 (0.1).
        bias_epochs / bias_lr: stage-2 optimisation.
    """

    def __init__(
        self,
        backbone: BackboneSpec = "resnet32",
        in_channels: int = 3,
        schedule: TaskSchedule | None = None,
        first_task: TaskSchedule | None = None,
        pretrained: str | None = None,
        memory_budget: int | None = 2000,
        memory_per_class: int | None = None,
        selection: Selection = "herding",
        temperature: float = 2.0,
        val_ratio: float = 0.1,
        bias_epochs: int = 200,
        bias_lr: float = 0.1,
    ) -> None:
        super().__init__(
            backbone, in_channels, schedule, first_task, pretrained, memory_budget, memory_per_class, selection
        )
        if not 0 < val_ratio < 1:
            raise ValueError(f"val_ratio={val_ratio} must be in (0, 1).")
        self.register_buffer("held_out", torch.zeros(0, dtype=torch.long), persistent=False)
        #: per task: (first class, end class, alpha, beta) of its bias layer
        self.bias_layers: list[tuple[int, int, float, float]] = []

    # ------------------------------------------------------------------ data

    def held_out_indices(self) -> Tensor:
        """Train-split samples this task's fit leaves out (stage 2's split), as the stream tells the data module."""
        return self.held_out

    def on_task_start(self, task: TaskInfo) -> None:
        super().on_task_start(task)
        self.held_out = self._split_held_out(task) if task.index > 0 else torch.zeros(0, dtype=torch.long)

    def _split_held_out(self, task: TaskInfo) -> Tensor:
        generator = torch.Generator().manual_seed(7_919 * (task.index + 1))
        per_class = max(1, round(self.hparams.val_ratio * min(len(v) for v in self.memory.exemplars.values())))
        # a random sample of each old class's exemplars, as of the new classes' samples (PyCIL, the paper): the
        # first exemplars are herding's best, and holding them out would leave stage 1 the least typical ones
        chosen = [
            members[torch.randperm(len(members), generator=generator)[:per_class]]
            for members in self.memory.exemplars.values()
        ]
        labels = self.task_data.labels
        for label in task.new_classes:
            members = torch.nonzero(labels == label).flatten()
            chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
        return torch.cat([torch.as_tensor(c, dtype=torch.long) for c in chosen])

    # ------------------------------------------------------------------ training

    def training_loss(self, logits: Tensor, labels: Tensor, images: Tensor) -> Tensor:
        # ``logits`` come from forward(), so the earlier tasks' bias layers are already applied (as in PyCIL)
        return self.weighted_distillation_loss(logits, labels, images, self.hparams.temperature)

    def forward(self, x: Tensor) -> Tensor:
        return self.correct(self.head(self.backbone(x)).float())

    def correct(self, logits: Tensor, layers: list[tuple[int, int, float, float]] | None = None) -> Tensor:
        """Apply the finished tasks' bias layers (or ``layers``) to their classes' logits."""
        layers = self.bias_layers if layers is None else layers
        layers = [layer for layer in layers if layer[0] < logits.shape[1]]
        if not layers:
            return logits
        scale = torch.ones(logits.shape[1], device=logits.device, dtype=logits.dtype)
        shift = torch.zeros_like(scale)
        for start, end, alpha, beta in layers:
            scale[start:end], shift[start:end] = alpha, beta
        return logits * scale + shift

    def teacher_logits(self, images: Tensor) -> Tensor:
        # the teacher is the corrected model of the previous task: every bias layer so far is one of its tasks'
        return self.correct(super().teacher_logits(images))

    def on_task_end(self, task: TaskInfo) -> None:
        if self.num_old_classes:
            self._train_bias_layer(task)
        self.held_out = torch.zeros(0, dtype=torch.long)
        self.update_memory(task)

    @torch.enable_grad()
    def _train_bias_layer(self, task: TaskInfo) -> None:
        """Stage 2: plain fp32 optimisation outside ``trainer.fit`` (autocast off; no loss scaling needed)."""
        with full_precision(self.trainer.strategy.root_device.type):
            self._fit_bias_layer(task)

    def _fit_bias_layer(self, task: TaskInfo) -> None:
        data = self.task_data
        device = data.device
        features = self.extract_features(data.subset(self.held_out)).to(device)
        targets = data.labels[self.held_out].to(device)
        with torch.no_grad():
            logits = self.correct(self.head(features))
        start, end = self.num_old_classes, task.num_seen_classes
        params = torch.tensor([1.0, 0.0], device=device, requires_grad=True)
        optimizer = torch.optim.SGD([params], lr=self.hparams.bias_lr, momentum=0.9)
        for _ in range(self.hparams.bias_epochs):
            corrected = torch.cat([logits[:, :start], logits[:, start:end] * params[0] + params[1]], dim=1)
            loss = F.cross_entropy(corrected, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        alpha, beta = (float(v) for v in self.trainer.strategy.broadcast(params.detach().cpu()))
        self.bias_layers.append((start, end, alpha, beta))

    # ------------------------------------------------------------------ checkpoints

    def architecture(self) -> dict[str, Any]:
        return {
            **super().architecture(),
            "bias_layers": self.bias_layers,
            "held_out": self.held_out.tolist(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        arch = checkpoint["lightning_cil"]
        self.bias_layers = [tuple(layer) for layer in arch["bias_layers"]]
        self.held_out = torch.tensor(arch["held_out"], dtype=torch.long)
