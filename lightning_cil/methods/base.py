"""The contract every method fulfils: a LightningModule with task hooks and a growing classifier."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_cil.data.scenario import TaskInfo
from lightning_cil.data.task_data import TaskData
from lightning_cil.methods.feature_cache import FrozenFeatureCache
from lightning_cil.methods.protocol import Protocol
from lightning_cil.methods.schedule import TaskSchedule
from lightning_cil.metrics import TaskAccuracy
from lightning_cil.networks import IncrementalLinear
from lightning_cil.networks.backbones import BackboneSpec, backbone_name, build_backbone
from lightning_cil.precision import check_precision, full_precision

__all__ = ["IncrementalModule", "TaskSchedule", "CHECKPOINT_KEY"]

#: where a lightning_cil checkpoint describes the architecture it holds
CHECKPOINT_KEY = "lightning_cil"


class IncrementalModule(LightningModule):
    """Base of all methods. Plain training on the current data with a growing head (= Finetune).

    The stream calls :meth:`on_task_start` before a task's fit and :meth:`on_task_end` after it (and
    :meth:`on_phase_end` between the fits of a task with several :meth:`task_phases`); all structural
    change (growing, freezing, copying a teacher, pruning) happens there, never inside a fit, so a
    fresh DDP wrap and optimizer see it. Subclasses change the loss (:meth:`training_loss`), the
    scores used at evaluation (:meth:`evaluation_scores`), or keep exemplars (``RehearsalModule``), and record
    what they grew in :meth:`architecture` so :meth:`on_load_checkpoint` can rebuild it. Task hooks read the
    stream's data through :attr:`task_data`, never through the trainer.

    Args:
        backbone: the feature extractor: a registered name (``lightning_cil.networks.list_backbones()``),
            ``timm:<model>``, ``torchvision:<model>``, or any ``nn.Module`` (a ``class_path``) that returns one
            feature vector per image (see ``networks/backbones.py``).
        in_channels: image channels (set from the data module by the CLI).
        schedule: optimisation of every task after the first (of every task if first_task is unset).
        first_task: optimisation of the first task.
        pretrained: backbone weights: ``hub`` (a timm/torchvision backbone's own weights; needs internet) or a
            local file (``.pth``, ``.safetensors``, a lightning_cil ``.ckpt``); None: random initialisation.
    """

    #: the data module trains on all tasks seen so far, not only the current one (Joint)
    trains_on_all_seen_tasks: ClassVar[bool] = False
    #: the method's protocol keeps no exemplars (a memory given to it is refused; see ``protocol.py``)
    rehearsal_free: ClassVar[bool] = False
    #: evaluation scorers; the first is the method's headline number
    scorers: ClassVar[tuple[str, ...]] = ("cnn",)
    #: task-end feature passes run under the Trainer's mixed precision, as training and evaluation do (the
    #: pre-trained ViTs: their statistics are fp32/fp64 either way); the others keep them in fp32 (herding)
    mixed_precision_features: ClassVar[bool] = False

    def __init__(
        self,
        backbone: BackboneSpec = "resnet32",
        in_channels: int = 3,
        schedule: TaskSchedule | None = None,
        first_task: TaskSchedule | None = None,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        # a module given as backbone is saved with the weights, not pickled into the hyperparameters
        self.save_hyperparameters(ignore=["backbone"])
        self.hparams["backbone"] = backbone_name(backbone)
        self.schedule = schedule or TaskSchedule()
        self.first_task_schedule = first_task
        self.schedule.check("schedule")
        if first_task is not None:
            first_task.check("first_task")
        self.backbone = self._build_backbone(backbone, in_channels, pretrained)
        self.head = IncrementalLinear(self.backbone.out_dim)
        self.task_index = -1
        self.num_tasks = 0
        self.scenario = "class"
        self.register_buffer("label_task", torch.zeros(0, dtype=torch.long), persistent=False)
        self.eval_metrics = nn.ModuleDict()
        #: per scorer, the counts of the last evaluation pass (read by the stream)
        self.last_evaluation: dict[str, dict[str, list[int]]] = {}
        self._task_data: TaskData | None = None
        #: frozen networks' features on test images (see :meth:`frozen_features`); not saved in checkpoints
        self.feature_cache = FrozenFeatureCache()
        #: False recomputes every frozen feature at every evaluation (the same numbers, more time)
        self.cache_frozen_features = True
        self._evaluation_ids: Tensor | None = None

    def protocol(self) -> Protocol:
        """What this method's protocol requires (checked by the stream before training, recorded in metrics.json);
        the base requires no more than :attr:`rehearsal_free` says."""
        return Protocol(rehearsal_free=self.rehearsal_free)

    def _build_backbone(self, spec: BackboneSpec, in_channels: int, pretrained: str | None) -> nn.Module:
        """The feature extractor (methods that grow their own, like DER, override this)."""
        return build_backbone(spec, in_channels, pretrained)

    def backbone_data_config(self) -> dict[str, Any] | None:
        """The input the backbone was trained for (timm's data config: input size, mean/std, interpolation), used
        for the data's default transforms; None for backbones without one."""
        return getattr(self.backbone, "data_config", None)

    def setup(self, stage: str) -> None:
        check_precision(self.trainer.precision)

    # ------------------------------------------------------------------ task hooks

    def on_task_start(self, task: TaskInfo) -> None:
        """Prepare for ``task``: the base grows the head to every class seen so far."""
        self._enter_task(task.index, task.num_tasks, task.scenario, task.label_task)
        self.head.expand(task.num_seen_classes)

    def on_task_end(self, task: TaskInfo) -> None:
        """Work after the task's epochs (memory, pruning, re-balancing). Nothing for plain training."""

    @property
    def task_data(self) -> TaskData:
        """The current task's data (labels, subsets, sharded feature extraction), handed over by the stream before
        :meth:`on_task_start` and kept until the next task starts."""
        if self._task_data is None:
            raise RuntimeError(
                "no task data: the stream hands it over before on_task_start (run the model with run_stream or "
                "`lightning-cil fit`)."
            )
        return self._task_data

    @task_data.setter
    def task_data(self, data: TaskData) -> None:
        self._task_data = data

    def task_phases(self, task: TaskInfo) -> list[int]:
        """Epochs of each fit of ``task``: one fit of the task's epochs by default. A method whose task has stages
        that each need their own optimizer returns several (PackNet: train, then retrain after pruning); the stream
        calls :meth:`on_phase_end` between them. The phases add up to the task's epochs."""
        return [self.schedule_for_task(task.index).epochs]

    def on_phase_end(self, task: TaskInfo, phase: int) -> None:
        """Work between fit ``phase`` and the next of a task with several phases. Nothing by default."""

    def exemplar_indices(self) -> Tensor | None:
        """Train-split indices the next fit adds to the current task's data (rehearsal methods). The stream asks
        once per fit, at its start."""
        return None

    def held_out_indices(self) -> Tensor | None:
        """Train-split samples the next fit leaves out of the task's data (e.g. BiC's bias-correction split)."""
        return None

    def memory_size(self) -> int | None:
        """Exemplars kept after the task end (recorded with the task's results); None without a memory."""
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
        need their own learning rate returns several groups: a group's ``lr_scale`` multiplies the schedule's ``lr``
        (e.g. SLCA's backbone at 0.01 of the head's), a group's ``lr`` replaces it."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_optimizers(self) -> dict[str, Any] | None:
        schedule = self.schedule_for_task(max(self.task_index, 0))
        if schedule.epochs == 0:
            return None  # a training-free task: its fit has no epochs and nothing to optimise
        optimizer, scheduler = schedule.build(self.parameter_groups())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ------------------------------------------------------------------ evaluation

    def evaluation_scores(self, images: Tensor) -> dict[str, Tensor]:
        """Class scores per scorer (keys = :attr:`scorers`)."""
        return {"cnn": self(images)}

    def _evaluate(self, batch: tuple[Tensor, ...]) -> None:
        images, labels, tasks, *ids = batch  # the evaluation loaders add each sample's test-split index
        self._evaluation_ids = ids[0] if ids else None
        try:
            for name, scores in self.evaluation_scores(images).items():
                self.eval_metrics[name].update(self.restrict_to_tasks(scores, tasks), labels, tasks)
        finally:
            self._evaluation_ids = None

    def frozen_features(self, name: str, images: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        """``compute(images)`` for an evaluation batch, where ``compute`` is a frozen network: inside a stream its
        rows are cached by test image (:class:`FrozenFeatureCache`), so that each test image passes through it once
        over the whole stream. Outside a stream's evaluation it is just ``compute(images)``. A method calls
        ``self.feature_cache.clear()`` whenever the network behind ``name`` changes."""
        if self._evaluation_ids is None or self._task_data is None or not self.cache_frozen_features:
            return compute(images)
        self.feature_cache.bind(self._task_data.test_split)
        return self.feature_cache.lookup(name, self._evaluation_ids, images, compute)

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
        self.feature_cache.clear()  # the weights change
        self._enter_task(arch["task_index"], arch["num_tasks"], arch["scenario"], arch["label_task"])
        self.head.expand(arch["head_classes"])

    @torch.no_grad()
    def extract_features(
        self,
        dataset: Dataset,
        flip: bool = False,
        batch_size: int = 256,
        network: Callable[[Tensor], Tensor] | None = None,
        dim: int | None = None,
    ) -> Tensor:
        """Backbone features (fp32) of every sample of ``dataset``, in dataset order, on the CPU; ``network`` (of
        ``dim`` outputs) computes other features instead (e.g. APER's two concatenated ViT passes).

        Runs between fits (task ends), in eval mode, on the training device, in full precision even when
        autocast is on (herding, class means and DER's balancing read these features), or under the Trainer's
        mixed precision where the method says so (:attr:`mixed_precision_features`). Under DDP each rank
        computes a shard and the shards are gathered (:meth:`TaskData.map`), so every rank returns the identical
        tensor. ``flip`` mirrors the images horizontally first (iCaRL's class means use both).
        """
        data = self.task_data
        was_training = self.training
        self.eval()
        self.to(data.device)

        compute = network or self.backbone

        def features(images: Tensor) -> Tensor:
            return compute(torch.flip(images, dims=[3]) if flip else images).float()

        if self.mixed_precision_features:
            precision = self.trainer.precision_plugin.forward_context()  # autocast under "*-mixed", else none
        else:
            precision = full_precision(data.device.type)
        with precision:
            out = data.map(features, dataset, dim or self.backbone.out_dim, batch_size)
        self.train(was_training)
        return out

    def num_parameters(self) -> int:
        """Parameters used at inference (a frozen teacher copy, if any, is not counted)."""
        return sum(p.numel() for p in self.backbone.parameters()) + sum(p.numel() for p in self.head.parameters())
