"""iCaRL: incremental classifier and representation learning (Rebuffi et al., CVPR 2017)."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_cil.data.memory import Selection
from lightning_cil.data.scenario import TaskInfo
from lightning_cil.methods.base import TaskSchedule
from lightning_cil.methods.distillation import DistillationModule, kd_loss
from lightning_cil.methods.rehearsal import RehearsalModule
from lightning_cil.networks.backbones import BackboneSpec

__all__ = ["ICaRL"]


class ICaRL(RehearsalModule, DistillationModule):
    """iCaRL: rehearsal with a herding-selected exemplar memory, distillation from the previous model, and
    a nearest-mean-of-exemplars (NME) classifier.

    - Representation learning (``loss="bce"``, the paper's): sigmoid outputs and binary cross-entropy over
      all seen classes; new-class targets are one-hot, old-class targets are the previous model's sigmoid
      outputs on the same images. The previous model is a frozen copy taken at task start.
      ``loss="kd"`` is PyCIL's variant: softmax cross-entropy plus soft-target distillation at ``temperature``
      (weight 1, no T^2 factor, as in PyCIL).
    - Memory: K exemplars in total (K / seen classes each), selected by herding on L2-normalised features;
      reducing a class keeps its first (highest-priority) exemplars.
    - NME: class mean = normalised mean of the exemplars' normalised features, averaged with the same for
      their horizontal flips and normalised again; a sample goes to the nearest mean. Evaluation reports
      NME (headline) and the network's own head ("cnn").

    Deviation: the class means are recomputed at every task end for all classes from the exemplars only
    (as in the paper); before the first task end (validation during the first fit) NME has no means and
    reports the head's scores.

    Args:
        backbone: feature extractor (ResNet-32 in the paper).
        in_channels / pretrained: as for every method.
        schedule: optimisation of later tasks (paper: 70 epochs, lr 2.0, /5 after 49 and 63, wd 1e-5).
        first_task: optimisation of the first task (default: the same as later tasks).
        memory_budget: total exemplars K (2,000 in the paper); None to use memory_per_class.
        memory_per_class: fixed exemplars per class instead of a total.
        selection: ``herding`` (paper), ``random`` or ``closest``.
        loss: ``bce`` (paper) or ``kd`` (PyCIL).
        temperature: KD temperature for ``loss="kd"`` (PyCIL: 2).
    """

    scorers = ("nme", "cnn")

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
        loss: Literal["bce", "kd"] = "bce",
        temperature: float = 2.0,
    ) -> None:
        super().__init__(
            backbone, in_channels, schedule, first_task, pretrained, memory_budget, memory_per_class, selection
        )
        if loss not in ("bce", "kd"):
            raise ValueError(f"loss={loss!r} is unknown; choose 'bce' (iCaRL paper) or 'kd' (PyCIL).")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be positive.")
        self.register_buffer("class_means", torch.zeros(0, self.backbone.out_dim))

    # ------------------------------------------------------------------ task hooks

    def on_task_end(self, task: TaskInfo) -> None:
        self.update_memory(task)
        self._compute_class_means(task.num_seen_classes)

    def _compute_class_means(self, num_classes: int) -> None:
        data = self.task_data
        exemplars = self.memory.indices()
        dataset = data.subset(exemplars)
        plain = F.normalize(self.extract_features(dataset), dim=1)
        flipped = F.normalize(self.extract_features(dataset, flip=True), dim=1)
        owner = data.labels[exemplars]
        means = torch.zeros(num_classes, plain.shape[1])
        for label in range(num_classes):
            rows = owner == label
            if rows.any():
                means[label] = (F.normalize(plain[rows].mean(0), dim=0) + F.normalize(flipped[rows].mean(0), dim=0)) / 2
        self.class_means = F.normalize(means, dim=1).to(self.class_means.device)

    # ------------------------------------------------------------------ training and scoring

    def training_loss(self, logits: Tensor, labels: Tensor, images: Tensor) -> Tensor:
        num_old = self.num_old_classes
        if self.hparams.loss == "bce":
            targets = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
            if num_old:
                with torch.no_grad():
                    targets[:, :num_old] = torch.sigmoid(self.teacher_logits(images).to(logits.dtype))
            return F.binary_cross_entropy_with_logits(logits, targets)
        loss = F.cross_entropy(logits, labels)
        if num_old:
            loss = loss + kd_loss(logits[:, :num_old], self.teacher_logits(images), self.hparams.temperature)
        return loss

    def evaluation_scores(self, images: Tensor) -> dict[str, Tensor]:
        features = self.backbone(images)
        logits = self.head(features)
        if len(self.class_means) < logits.shape[1]:
            return {"nme": logits, "cnn": logits}
        distance = torch.cdist(F.normalize(features.float(), dim=1), self.class_means[: logits.shape[1]].float())
        return {"nme": -distance, "cnn": logits}

    # ------------------------------------------------------------------ checkpoints

    def architecture(self) -> dict[str, Any]:
        return {**super().architecture(), "class_means": list(self.class_means.shape)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        arch = checkpoint["lightning_cil"]
        self.class_means = torch.zeros(*arch["class_means"])
