"""SLCA (Zhang et al., "SLCA: Slow Learner with Classifier Alignment for Continual Learning on a Pre-trained Model",
ICCV 2023)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lightning_cil.data.scenario import TaskInfo
from lightning_cil.methods.base import IncrementalModule
from lightning_cil.methods.protocol import Protocol
from lightning_cil.methods.prototypes import VIT_IN21K
from lightning_cil.methods.schedule import TaskSchedule
from lightning_cil.networks.backbones import BackboneSpec
from lightning_cil.networks.heads import TaskHeads
from lightning_cil.precision import full_precision

__all__ = ["SLCA"]


class SLCA(IncrementalModule):
    """Slow learner: the whole pre-trained ViT fine-tuned on every task at a hundredth of the head's learning rate,
    one linear head per task (earlier ones frozen, the loss over the current head's classes only). Classifier
    alignment: after each task, the class statistics (mean and covariance of the training features under the test
    transform) of the new classes are stored, and from the second task on every head is retrained on features
    sampled from all seen classes' Gaussians.

    - Slow learner (CIFAR): SGD momentum 0.9, wd 5e-4, batch 128, head lr 0.01, backbone lr 1e-4
      (``backbone_lr_scale`` 0.01), 20 epochs with the LR x0.1 after 18.
    - Statistics: mean and covariance + ``covariance_eps`` I (1e-4) per new class, never refreshed; stored as the
      Cholesky factor of the covariance (float32; computed in float64 from the ViT's features, whose forward runs
      under the Trainer's precision: bf16 under ``bf16-mixed``).
    - Alignment (task >= 2): ``align_epochs`` (5) epochs, each on ``align_samples`` (256) draws per class from
      N(s * mu_c, Sigma_c), s = 0.9 + 0.1 (t_c + 1) / (t + 1) for a class of task t_c (the official code's decay of
      old means); every head trained with SGD (lr ``align_lr`` 0.01, momentum 0.9, cosine schedule) on
      cross-entropy of the logits divided by their mean per-task-head L2 norm and by ``temperature`` (0.1).

    The draws come from a generator seeded by the task, the same on every rank, and the aligned heads are
    broadcast from rank 0, so every rank ends with the same classifier.

    Args:
        backbone / in_channels / pretrained: the pre-trained timm ViT (any backbone works; the paper's is IN21K).
        schedule / first_task: the slow learner's optimisation (its lr is the head's).
        backbone_lr_scale: backbone lr / head lr.
        align_epochs / align_samples / align_lr / align_batch: the classifier alignment.
        temperature: the alignment's logit temperature.
        covariance_eps: added to each class covariance's diagonal.
    """

    rehearsal_free = True
    mixed_precision_features = True

    def __init__(
        self,
        backbone: BackboneSpec = f"timm:{VIT_IN21K}",
        in_channels: int = 3,
        schedule: TaskSchedule | None = None,
        first_task: TaskSchedule | None = None,
        pretrained: str | None = "hub",
        backbone_lr_scale: float = 0.01,
        align_epochs: int = 5,
        align_samples: int = 256,
        align_lr: float = 0.01,
        align_batch: int = 128,
        temperature: float = 0.1,
        covariance_eps: float = 1e-4,
    ) -> None:
        schedule = schedule or TaskSchedule(epochs=20, lr=0.01, momentum=0.9, weight_decay=5e-4, milestones=[18])
        super().__init__(backbone, in_channels, schedule, first_task, pretrained)
        self.hparams["schedule"] = self.schedule
        if not 0 < backbone_lr_scale <= 1:
            raise ValueError(f"backbone_lr_scale={backbone_lr_scale} must be in (0, 1] (SLCA: 0.01).")
        if align_epochs < 0 or align_samples < 1 or temperature <= 0:
            raise ValueError("align_epochs must be >= 0, align_samples >= 1 and temperature > 0.")
        dim = self.backbone.out_dim
        self.head = TaskHeads(dim)
        self.register_buffer("class_means", torch.zeros(0, dim))
        self.register_buffer("class_scales", torch.zeros(0, dim, dim))  # Cholesky factors of the covariances
        self.register_buffer("class_task", torch.zeros(0, dtype=torch.long))
        # identical on every rank by construction (gathered features): DDP need not broadcast them at every step
        # (a ViT-B's covariances of 100 classes are 236 MB)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, ["class_means", "class_scales", "class_task"]
        )

    def protocol(self) -> Protocol:
        return Protocol(rehearsal_free=True, paper_weights=(VIT_IN21K,))

    def parameter_groups(self) -> list[dict[str, Any]]:
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [p for p in self.head.parameters() if p.requires_grad]
        return [{"params": backbone, "lr_scale": self.hparams.backbone_lr_scale}, {"params": head}]

    def training_loss(self, logits: Tensor, labels: Tensor, images: Tensor) -> Tensor:
        """Cross-entropy over the current task's head only (local labels)."""
        first = min(self.task_data.info.new_classes)
        return F.cross_entropy(logits[:, first:], labels - first)

    # ------------------------------------------------------------------ task end: statistics and alignment

    def on_task_end(self, task: TaskInfo) -> None:
        data = self.task_data
        indices = torch.cat([data.members(label) for label in task.new_classes])
        features, labels = self.extract_features(data.subset(indices)).double(), data.labels[indices]
        count = task.num_seen_classes
        means = torch.zeros(count, features.shape[1])
        scales = torch.zeros(count, features.shape[1], features.shape[1])
        tasks = torch.zeros(count, dtype=torch.long)
        old = len(self.class_means)
        means[:old], scales[:old], tasks[:old] = self.class_means.cpu(), self.class_scales.cpu(), self.class_task.cpu()
        eye = torch.eye(features.shape[1], dtype=torch.float64)
        for label in task.new_classes:
            rows = features[labels == label]
            mean = rows.mean(0)
            centred = rows - mean
            covariance = centred.T @ centred / max(len(rows) - 1, 1) + self.hparams.covariance_eps * eye
            means[label], scales[label] = mean.float(), torch.linalg.cholesky(covariance).float()
            tasks[label] = task.index
        device = self.class_means.device
        self.class_means, self.class_scales, self.class_task = means.to(device), scales.to(device), tasks.to(device)
        if task.index > 0 and self.hparams.align_epochs:
            device = self.trainer.strategy.root_device
            with full_precision(device.type):
                self._align_classifier(task, device)

    def _align_classifier(self, task: TaskInfo, device: torch.device) -> None:
        hp = self.hparams
        generator = torch.Generator().manual_seed(20_011 * (task.index + 1))
        self.head.to(device).requires_grad_(True)
        parameters = list(self.head.parameters())
        optimizer = torch.optim.SGD(parameters, lr=hp.align_lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, hp.align_epochs)
        sizes = [h.out_features for h in self.head.heads]
        classes = task.num_seen_classes
        shrink = 0.9 + 0.1 * (self.class_task.float().cpu() + 1) / (task.index + 1)  # [C]
        for _ in range(hp.align_epochs):
            noise = torch.randn(classes, hp.align_samples, self.backbone.out_dim, generator=generator)
            samples = self.class_means.cpu()[:, None] * shrink[:, None, None] + noise @ self.class_scales.cpu().mT
            inputs = samples.reshape(-1, samples.shape[-1]).to(device)
            targets = torch.arange(classes).repeat_interleave(hp.align_samples).to(device)
            order = torch.randperm(len(targets), generator=generator).to(device)
            for batch in order.split(hp.align_batch):
                logits = self.head(inputs[batch])
                norms = torch.stack([part.norm(dim=1) for part in logits.split(sizes, dim=1)]).mean(0) + 1e-7
                loss = F.cross_entropy(logits / norms[:, None] / hp.temperature, targets[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            scheduler.step()
        state = self.trainer.strategy.broadcast({k: v.detach().cpu() for k, v in self.head.state_dict().items()})
        self.head.load_state_dict(state)
        for head in self.head.heads:
            head.requires_grad_(False)  # the next task trains its own head only

    # ------------------------------------------------------------------ checkpoints

    def architecture(self) -> dict[str, Any]:
        return {**super().architecture(), "head_sizes": [h.out_features for h in self.head.heads]}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        arch = self.check_checkpoint_identity(checkpoint)
        for size in arch["head_sizes"]:
            self.head.expand(self.head.out_features + size)
        super().on_load_checkpoint(checkpoint)
        stored = checkpoint["state_dict"].get("class_means")
        count, dim = (len(stored) if stored is not None else 0), self.backbone.out_dim
        self.class_means = torch.zeros(count, dim)
        self.class_scales = torch.zeros(count, dim, dim)
        self.class_task = torch.zeros(count, dtype=torch.long)
