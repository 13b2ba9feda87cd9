"""The contract every method fulfils: a LightningModule with task hooks and a growing classifier."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_cil.data.memory import ExemplarMemory
from lightning_cil.data.samplers import ShardedEvalSampler
from lightning_cil.data.scenario import TaskInfo
from lightning_cil.metrics import TaskAccuracy
from lightning_cil.networks import IncrementalLinear, build_backbone
from lightning_cil.precision import check_precision, full_precision

__all__ = ["IncrementalModule", "TaskSchedule", "CHECKPOINT_KEY"]

#: where a lightning_cil checkpoint describes the architecture it holds
CHECKPOINT_KEY = "lightning_cil"


@dataclass
class TaskSchedule:
    """Optimisation of one task: every CIL paper gives the first task its own epochs and learning rates.

    Args:
        epochs: training epochs of the task.
        lr: initial learning rate.
        optimizer: ``sgd``, ``adam`` or ``adamw``.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        milestones: epochs (counted within the task) after which the LR is multiplied by ``gamma``.
        gamma: LR decay factor.
        warmup_epochs: linear LR warm-up epochs at the start of the task.
    """

    epochs: int = 70
    lr: float = 0.1
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: int = 0

    def check(self, name: str) -> None:
        if self.epochs < 1:
            raise ValueError(f"{name}.epochs={self.epochs} must be at least 1.")
        if self.lr <= 0:
            raise ValueError(f"{name}.lr={self.lr} must be positive.")
        bad = [m for m in self.milestones if not 0 < m < self.epochs]
        if bad:
            raise ValueError(f"{name}.milestones {bad} must lie within 1..{self.epochs - 1} (epochs={self.epochs}).")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"{name}.warmup_epochs={self.warmup_epochs} must be in 0..{self.epochs - 1}.")


# Hyperparameters saved in checkpoints hold TaskSchedule objects: allow them under weights_only loading.
torch.serialization.add_safe_globals([TaskSchedule])


class IncrementalModule(LightningModule):
    """Base of all methods. Plain training on the current data with a growing head (= Finetune).

    The stream calls :meth:`on_task_start` before a task's fit and :meth:`on_task_end` after it; all
    structural change (growing, freezing, copying a teacher) happens there, never inside a fit, so a
    fresh DDP wrap and optimizer see it. Subclasses change the loss (:meth:`training_loss`), the
    scores used at evaluation (:meth:`evaluation_scores`), or keep exemplars (:meth:`exemplar_indices`),
    and record what they grew in :meth:`on_save_checkpoint` so :meth:`on_load_checkpoint` can rebuild it.

    Args:
        backbone: feature extractor name (see ``lightning_cil.networks.list_backbones()``).
        in_channels: image channels (set from the data module by the CLI).
        schedule: optimisation of every task after the first (of every task if first_task is unset).
        first_task: optimisation of the first task.
    """

    #: the data module trains on all tasks seen so far, not only the current one (Joint)
    trains_on_all_seen_tasks: ClassVar[bool] = False
    #: evaluation scorers; the first is the method's headline number
    scorers: ClassVar[tuple[str, ...]] = ("cnn",)

    def __init__(
        self,
        backbone: str = "resnet32",
        in_channels: int = 3,
        schedule: TaskSchedule | None = None,
        first_task: TaskSchedule | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.schedule = schedule or TaskSchedule()
        self.first_task_schedule = first_task
        self.schedule.check("schedule")
        if first_task is not None:
            first_task.check("first_task")
        self.backbone = self._build_backbone(backbone, in_channels)
        self.head = IncrementalLinear(self.backbone.out_dim)
        self.task_index = -1
        self.num_tasks = 0
        self.scenario = "class"
        self.register_buffer("label_task", torch.zeros(0, dtype=torch.long), persistent=False)
        self.eval_metrics = nn.ModuleDict()
        #: per scorer, the counts of the last evaluation pass (read by the stream)
        self.last_evaluation: dict[str, dict[str, list[int]]] = {}

    def _build_backbone(self, name: str, in_channels: int) -> nn.Module:
        """The feature extractor (methods that grow their own, like DER, override this)."""
        return build_backbone(name, in_channels)

    def setup(self, stage: str) -> None:
        check_precision(self.trainer.precision)

    # ------------------------------------------------------------------ task hooks

    def on_task_start(self, task: TaskInfo) -> None:
        """Prepare for ``task``: the base grows the head to every class seen so far. A rehearsal method's
        ``memory`` is checked against the stream's classes here, before any training."""
        memory = getattr(self, "memory", None)
        if isinstance(memory, ExemplarMemory):
            memory.check_capacity(task.num_total_classes)
        self._enter_task(task.index, task.num_tasks, task.scenario, task.label_task)
        self.head.expand(task.num_seen_classes)

    def on_task_end(self, task: TaskInfo) -> None:
        """Work after the task's epochs (memory, pruning, re-balancing). Nothing for plain training."""

    def exemplar_indices(self) -> Tensor | None:
        """Train-split indices the data module adds to the current task's data (rehearsal methods)."""
        return None

    def schedule_for_task(self, task: int) -> TaskSchedule:
        if task == 0 and self.first_task_schedule is not None:
            return self.first_task_schedule
        return self.schedule

    def _enter_task(self, index: int, num_tasks: int, scenario: str, label_task) -> None:
        self.task_index, self.num_tasks, self.scenario = index, num_tasks, scenario
        self.label_task = torch.as_tensor(list(label_task), dtype=torch.long, device=self.label_task.device)
        for name in self.scorers:
            if name not in self.eval_metrics or self.eval_metrics[name].num_tasks != num_tasks:
                self.eval_metrics[name] = TaskAccuracy(num_tasks)

    # ------------------------------------------------------------------ training

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def training_loss(self, logits: Tensor, labels: Tensor, images: Tensor) -> Tensor:
        """Loss of one batch; plain cross-entropy over all seen classes here."""
        return F.cross_entropy(logits, labels)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels, tasks = batch
        # fp32 logits: under mixed precision the losses (and their sums) are then computed in fp32
        logits = self.restrict_to_tasks(self(images).float(), tasks)
        loss = self.training_loss(logits, labels, images)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(labels))
        return loss

    def restrict_to_tasks(self, scores: Tensor, tasks: Tensor) -> Tensor:
        """In a task-incremental stream only the sample's own task's classes compete."""
        if self.scenario != "task":
            return scores
        own = self.label_task[: scores.shape[1]][None, :] == tasks[:, None]
        return scores.masked_fill(~own, torch.finfo(scores.dtype).min)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """What the optimizer trains: the trainable parameters at the schedule's learning rate. A method whose parts
        need their own learning rate returns several groups (a group's ``lr`` overrides the schedule's)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_optimizers(self) -> dict[str, Any]:
        schedule = self.schedule_for_task(max(self.task_index, 0))
        params = self.parameter_groups()
        if schedule.optimizer == "sgd":
            opt = torch.optim.SGD(params, schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay)
        elif schedule.optimizer == "adam":
            opt = torch.optim.Adam(params, schedule.lr, weight_decay=schedule.weight_decay)
        else:
            opt = torch.optim.AdamW(params, schedule.lr, weight_decay=schedule.weight_decay)
        decay = torch.optim.lr_scheduler.MultiStepLR(opt, schedule.milestones, schedule.gamma)
        if schedule.warmup_epochs:
            warmup = torch.optim.lr_scheduler.LinearLR(
                opt, 1.0 / (schedule.warmup_epochs + 1), 1.0, schedule.warmup_epochs
            )
            decay = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, decay], [schedule.warmup_epochs])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "epoch"}}

    # ------------------------------------------------------------------ evaluation

    def evaluation_scores(self, images: Tensor) -> dict[str, Tensor]:
        """Class scores per scorer (keys = :attr:`scorers`)."""
        return {"cnn": self(images)}

    def _evaluate(self, batch: tuple[Tensor, Tensor, Tensor]) -> None:
        images, labels, tasks = batch
        for name, scores in self.evaluation_scores(images).items():
            self.eval_metrics[name].update(self.restrict_to_tasks(scores, tasks), labels, tasks)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def _log_evaluation(self, stage: str) -> None:
        self.last_evaluation = {}
        logged: dict[str, float] = {"task": float(self.task_index)}
        for name in self.scorers:
            metric = self.eval_metrics[name]
            result = metric.compute()
            metric.reset()
            # reshape: torchmetrics squeezes one-element results to 0-d (a stream of one task)
            correct, top_k, total = (result[k].cpu().reshape(-1) for k in ("correct", "correct_top_k", "total"))
            self.last_evaluation[name] = {
                "correct": correct.tolist(),
                "correct_top5": top_k.tolist(),
                "total": total.tolist(),
            }
            seen = slice(0, self.task_index + 1)
            n = total[seen].sum().clamp(min=1).item()
            logged[f"{stage}/{name}/acc_seen"] = correct[seen].sum().item() / n
            logged[f"{stage}/{name}/top5_seen"] = top_k[seen].sum().item() / n
            for j in range(self.task_index + 1):
                logged[f"{stage}/{name}/acc_task{j}"] = correct[j].item() / max(total[j].item(), 1)
        # Values are already identical on every rank (torchmetrics synced the counts); the mean keeps them.
        self.log_dict(logged, sync_dist=True)

    # ------------------------------------------------------------------ checkpoints

    def architecture(self) -> dict[str, Any]:
        """What the checkpoint must record to rebuild this module's shapes; extended by subclasses."""
        return {
            "method": f"{type(self).__module__}.{type(self).__qualname__}",
            "backbone": self.hparams.backbone,
            "in_channels": self.hparams.in_channels,
            "task_index": self.task_index,
            "num_tasks": self.num_tasks,
            "scenario": self.scenario,
            "label_task": self.label_task.tolist(),
            "head_classes": self.head.out_features,
            "schedule": asdict(self.schedule),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.architecture()

    def check_checkpoint_identity(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's architecture entry, once its method, backbone and input channels match this model's."""
        arch = checkpoint.get(CHECKPOINT_KEY)
        if arch is None:
            raise ValueError("this checkpoint was not written by a lightning_cil stream (no 'lightning_cil' entry).")
        mine = self.architecture()
        for key in ("method", "backbone", "in_channels"):
            if arch[key] != mine[key]:
                raise ValueError(
                    f"checkpoint mismatch: it holds {key}={arch[key]!r} but this run is configured with "
                    f"{key}={mine[key]!r}; resume with the configuration that wrote the checkpoint."
                )
        return arch

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        arch = self.check_checkpoint_identity(checkpoint)
        self._enter_task(arch["task_index"], arch["num_tasks"], arch["scenario"], arch["label_task"])
        self.head.expand(arch["head_classes"])

    @torch.no_grad()
    def extract_features(self, dataset: Dataset, flip: bool = False, batch_size: int = 256) -> Tensor:
        """Backbone features (fp32) of every sample of ``dataset``, in dataset order, on the CPU.

        Runs between fits (task ends), in eval mode, on the training device, in full precision even when
        autocast is on (herding, class means and DER's balancing read these features). Under DDP each rank
        computes a shard and the shards are gathered, so every rank returns the identical tensor.
        ``flip`` mirrors the images horizontally first (iCaRL's class means use both).
        """
        trainer = self.trainer
        world, rank = trainer.world_size, trainer.global_rank
        device = trainer.strategy.root_device
        was_training = self.training
        self.eval()
        self.to(device)
        workers = getattr(trainer.datamodule, "hparams", {}).get("num_workers", 0) if trainer.datamodule else 0
        loader = DataLoader(dataset, batch_size, sampler=ShardedEvalSampler(dataset, world, rank), num_workers=workers)
        parts = []
        with full_precision(device.type):
            for images, _, _ in loader:
                images = images.to(device)
                if flip:
                    images = torch.flip(images, dims=[3])
                parts.append(self.backbone(images).float())
        local = torch.cat(parts) if parts else torch.zeros(0, self.backbone.out_dim, device=device)
        self.train(was_training)
        if world == 1:
            return local.cpu()
        n, per_rank = len(dataset), math.ceil(len(dataset) / world)
        padded = torch.zeros(per_rank, local.shape[1], device=device)
        padded[: len(local)] = local
        gathered = trainer.strategy.all_gather(padded).cpu()  # [world, per_rank, d]
        features = torch.empty(n, local.shape[1])
        for r in range(world):
            positions = torch.arange(r, n, world)
            features[positions] = gathered[r, : len(positions)]
        return features

    def update_memory(self, memory: ExemplarMemory, task: TaskInfo) -> None:
        """Rehearsal step of a task end: shrink old classes to the new quota, then select exemplars for the new
        classes from their training samples, on this module's current features (shared by rehearsal methods)."""
        datamodule = self.trainer.datamodule
        labels = datamodule.train_labels()
        new = {}
        for label in task.new_classes:
            indices = torch.nonzero(labels == label).flatten()
            new[label] = (indices, self.extract_features(datamodule.train_subset(indices)))
        memory.update(range(task.num_seen_classes), new)

    def num_parameters(self) -> int:
        """Parameters used at inference (a frozen teacher copy, if any, is not counted)."""
        return sum(p.numel() for p in self.backbone.parameters()) + sum(p.numel() for p in self.head.parameters())
