"""DER: dynamically expandable representation (Yan, Xie and He, CVPR 2021)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_cil.data.memory import Selection
from lightning_cil.data.scenario import TaskInfo
from lightning_cil.methods.base import TaskSchedule
from lightning_cil.methods.feature_cache import SampleFeatureBank
from lightning_cil.methods.rehearsal import RehearsalModule
from lightning_cil.networks import ExpandableBackbone, IncrementalLinear
from lightning_cil.networks.backbones import BackboneSpec
from lightning_cil.networks.channel_pruning import resnet_layout
from lightning_cil.precision import full_precision

__all__ = ["DER"]


class DER(RehearsalModule):
    """DER: one new feature extractor per task, channel-pruned after its task (``prune: false`` is "DER w/o P").

    - At task t a new extractor F_t, initialised from F_{t-1}, joins the frozen F_1..F_{t-1} (weights and
      BatchNorm statistics). The classifier reads the concatenated super-feature and covers all seen
      classes; old weights keep their columns, new columns start random (as in the official code).
    - From the second task on, an auxiliary classifier on F_t's features alone has |new classes| + 1
      outputs (every old class maps to one label); its cross-entropy is added with weight ``aux_weight``.
    - Pruning: F_t's channels carry masks m = sigmoid(s * e) (see ``networks/channel_pruning.py``), s annealed
      over each epoch's batches from 1/s_max to s_max (HAT's schedule), and ``sparsity_weight`` times the
      size-weighted fraction of weights in use joins the loss (the embeddings have no weight decay, as in
      HAT). At the task end the masks are binarised and the channels that are off are removed from F_t
      (smaller conv and BN layers, fewer classifier columns).
    - Classifier learning stage at the task end: the classifier is re-initialised and trained alone on a
      class-balanced set (the exemplars, plus as many samples of each new class), with logits divided by
      ``temperature``. Then the exemplar memory is rebuilt by herding on the super-feature.

    Deviations, and why:
    - DER publishes neither s_max nor lambda_s (its code never released the pruning). s_max = 400 is HAT's
      value; ``sparsity_weight`` must be tuned per setting, as the paper did. HAT's embedding-gradient
      compensation and its clamp of e to [-6, 6] are used: without them the annealed masks hardly learn.
    - The annealing starts each epoch at s = 1 (``mask_scale_min``), not HAT's 1/s_max. At 1/s_max every
      mask is 0.5 at once in the first batch of every epoch; in a residual network with BatchNorm that
      diverged (digits stream: loss 191, a BatchNorm running variance of 2.7e5, chance accuracy), while
      s = 1 trains like the unpruned model. Embeddings start at +6 (all channels on, HAT's bound) because
      F_t starts as a copy of a trained extractor whose channels are all in use.
    - The sparsity loss is the paper's. Its stage-wide residual-stream gates appear in every convolution of
      their stage, so they are the cheapest way to cut weights; with a large lambda_s a whole stage
      collapses (digits: lambda_s 20 kept 79% of channels but 9% of the weights, and accuracy fell to
      chance). Raise ``sparsity_weight`` gradually.
    - F_t+1 is initialised from the full-width F_t (kept frozen until then), not from its pruned remains, so
      pruning one task does not shrink the starting point of the next.
    - The balancing stage trains on features of the un-augmented balanced set. The extractors are frozen
      in that stage, so the features are computed once; 30 epochs of a linear layer then take
      milliseconds, not 30 passes through t backbones. Under DDP every rank trains the same head from
      the same gathered features and seed, and rank 0's result is broadcast.
    - The task ends' features are computed once per (sample, extractor): the final extractors' features of the
      exemplars are kept from the task end that computed them (:class:`SampleFeatureBank`, at most memory x
      extractors rows), so a task end runs the old extractors on the new classes' images only, and the newest on
      all. The numbers are those of recomputing everything (a test compares the streams).

    Args:
        backbone: per-task extractor (official CIFAR: ``resnet18_cifar``; ImageNet: ``resnet18``).
        in_channels / pretrained: as for every method.
        schedule / first_task: optimisation of later / first tasks.
        memory_budget / memory_per_class / selection: the exemplar memory (2,000 total, herding).
        aux_weight: weight of the auxiliary loss (1 in the paper).
        temperature: logit temperature of the balancing stage (CIFAR 5, ImageNet 1).
        balance_epochs: epochs of the balancing stage (30); 0 skips it.
        balance_lr: its learning rate (0.1), divided by 10 at each of ``balance_milestones`` ([15]).
        prune: learn channel masks and prune each extractor after its task (false: "DER w/o P", which the
            paper reports as slightly more accurate).
        sparsity_weight: lambda_s, the weight of the sparsity loss (unpublished; tune per setting).
        mask_scale_max: s_max of the mask annealing (HAT: 400).
        mask_scale_min: s at the first batch of every epoch (HAT: 1/s_max; see the deviations).
    """

    def __init__(
        self,
        backbone: BackboneSpec = "resnet18_cifar",
        in_channels: int = 3,
        schedule: TaskSchedule | None = None,
        first_task: TaskSchedule | None = None,
        pretrained: str | None = None,
        memory_budget: int | None = 2000,
        memory_per_class: int | None = None,
        selection: Selection = "herding",
        aux_weight: float = 1.0,
        temperature: float = 5.0,
        balance_epochs: int = 30,
        balance_lr: float = 0.1,
        balance_milestones: list[int] | None = None,
        prune: bool = False,
        sparsity_weight: float = 10.0,
        mask_scale_max: float = 400.0,
        mask_scale_min: float = 1.0,
    ) -> None:
        super().__init__(
            backbone, in_channels, schedule, first_task, pretrained, memory_budget, memory_per_class, selection
        )
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be positive.")
        if balance_epochs < 0:
            raise ValueError(f"balance_epochs={balance_epochs} must be >= 0.")
        if sparsity_weight < 0:
            raise ValueError(f"sparsity_weight={sparsity_weight} must be >= 0.")
        if not 0 < mask_scale_min < mask_scale_max:
            raise ValueError(
                f"mask scales must satisfy 0 < mask_scale_min < mask_scale_max; got {mask_scale_min} and "
                f"{mask_scale_max}."
            )
        self.aux_head: nn.Linear | None = None
        self.num_old_classes = 0
        #: per finished task, the fraction of F_t's channels its masks kept (empty without pruning)
        self.pruning_history: list[float] = []
        #: the final extractors' features of the exemplars (see :meth:`sample_features`); not saved in checkpoints
        self.exemplar_features = SampleFeatureBank()

    def _build_backbone(self, spec: BackboneSpec, in_channels: int, pretrained: str | None) -> nn.Module:
        backbone = ExpandableBackbone(spec, in_channels, pretrained)
        if self.hparams.prune:
            resnet_layout(backbone.extractors[0])  # refuses, before any training, a backbone it cannot prune
        return backbone

    # ------------------------------------------------------------------ task hooks

    def on_task_start(self, task: TaskInfo) -> None:
        self.num_old_classes = task.num_old_classes
        if task.index > 0:
            self.backbone.expand()
            self.head.expand_inputs(self.backbone.out_dim)
            self.aux_head = nn.Linear(self.backbone.newest_dim, len(task.new_classes) + 1)
        if self.hparams.prune:
            self.backbone.attach_gates(self.hparams.mask_scale_max)
        super().on_task_start(task)

    def on_task_end(self, task: TaskInfo) -> None:
        if self.backbone.gates is not None:
            self._prune_newest_extractor()
        if self.num_old_classes and self.hparams.balance_epochs:
            self._balance_classifier(task)
        self.update_memory(task)
        self.exemplar_features.keep(self.memory.indices())

    def sample_features(self, indices: Tensor) -> Tensor:
        """Super-features of train-split samples under the test transform, at a task end, when every extractor is
        final: each extractor runs only on the samples it has no kept row for, grouped so that every image is
        loaded once per group of extractors it needs."""
        if not self.cache_frozen_features:
            return super().sample_features(indices)
        extractors = list(self.backbone.extractors)
        names = [f"extractor{i}" for i in range(len(extractors))]
        missing = torch.stack([self.exemplar_features.missing(name, indices) for name in names], dim=1)
        for pattern in torch.unique(missing, dim=0):
            if not pattern.any():
                continue
            rows = (missing == pattern).all(dim=1)
            needed = [extractors[i] for i in pattern.nonzero().flatten().tolist()]

            def network(images: Tensor, needed: list[nn.Module] = needed) -> Tensor:
                return torch.cat([extractor(images) for extractor in needed], dim=1)

            fresh = self.extract_features(
                self.task_data.subset(indices[rows]), network=network, dim=sum(e.out_dim for e in needed)
            )
            parts = fresh.split([e.out_dim for e in needed], dim=1)
            for i, part in zip(pattern.nonzero().flatten().tolist(), parts):
                self.exemplar_features.store(names[i], indices[rows], part)
        return torch.cat([self.exemplar_features.rows(name, indices) for name in names], dim=1)

    # ------------------------------------------------------------------ training

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels, tasks = batch
        super_feature, newest = self.backbone.forward_all(images)
        logits = self.restrict_to_tasks(self.head(super_feature).float(), tasks)
        loss = F.cross_entropy(logits, labels)
        if self.aux_head is not None:
            aux_labels = torch.where(labels >= self.num_old_classes, labels - self.num_old_classes + 1, 0)
            aux_loss = F.cross_entropy(self.aux_head(newest).float(), aux_labels)
            self.log("train/aux_loss", aux_loss, on_step=False, on_epoch=True, batch_size=len(labels))
            loss = loss + self.hparams.aux_weight * aux_loss
        gates = self.backbone.gates
        if gates is not None:
            sparsity = gates.sparsity()
            self.log("train/sparsity", sparsity, on_step=False, on_epoch=True, batch_size=len(labels))
            loss = loss + self.hparams.sparsity_weight * sparsity
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(labels))
        return loss

    def evaluation_scores(self, images: Tensor) -> dict[str, Tensor]:
        """The classifier on the super-feature. An extractor is final once its task has ended (frozen, pruned):
        its features of a test image are computed at the image's first evaluation and reused by every later one
        (``frozen_features``), so that an evaluation runs the old extractors on the new tasks' images only. The
        extractor a fit is still training (validation during the fit) is always run."""
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        newest = len(self.backbone.extractors) - 1
        features = [
            extractor(images) if fitting and i == newest else self.frozen_features(f"extractor{i}", images, extractor)
            for i, extractor in enumerate(self.backbone.extractors)
        ]
        return {"cnn": self.head(torch.cat(features, dim=1))}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The mask embeddings train without weight decay, as in HAT: decay would pull every e towards 0, i.e.
        every mask towards sigmoid(0) = 0.5 once annealed, against the sparsity loss that decides which go off."""
        gates = self.backbone.gates
        embeddings = [e for e in gates.embeddings if e.requires_grad] if gates is not None else []
        ids = {id(e) for e in embeddings}
        others = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": others}] + ([{"params": embeddings, "weight_decay": 0.0}] if embeddings else [])

    # ------------------------------------------------------------------ pruning

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Anneal the mask scale over the epoch's batches: s = s_min + (s_max - s_min) * b / (B - 1)."""
        gates = self.backbone.gates
        if gates is not None:
            s_max, batches = gates.s_max, self.trainer.num_training_batches
            s_min = self.hparams.mask_scale_min
            gates.scale = s_min + (s_max - s_min) * batch_idx / max(batches - 1, 1)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.backbone.gates is not None:
            self.backbone.gates.clamp_()

    def _prune_newest_extractor(self) -> None:
        """Binarise F_t's masks, remove its channels that are off, and drop the classifier columns reading them."""
        gates = self.backbone.gates
        self.exemplar_features.forget(f"extractor{len(self.backbone.extractors) - 1}")  # its network changes
        kept_fraction = gates.fraction_kept()
        offset = self.backbone.out_dim - self.backbone.newest_dim
        kept = self.backbone.prune_newest().to(self.head.weight.device)
        self.head.keep_inputs(torch.cat([torch.arange(offset, device=kept.device), offset + kept]))
        if self.aux_head is not None:
            self.aux_head.weight = nn.Parameter(self.aux_head.weight.detach()[:, kept].clone())
            self.aux_head.in_features = len(kept)
        self.pruning_history.append(kept_fraction)

    @torch.enable_grad()
    def _balance_classifier(self, task: TaskInfo) -> None:
        """Re-initialise the classifier and train it on a class-balanced set of super-features.

        Plain fp32 optimisation outside ``trainer.fit`` (autocast off, so no loss scaling is needed under 16-mixed).
        """
        device = self.trainer.strategy.root_device
        with full_precision(device.type):
            self._train_balanced_head(task, device)

    def _train_balanced_head(self, task: TaskInfo, device: torch.device) -> None:
        data = self.task_data
        per_class = max(len(v) for v in self.memory.exemplars.values())
        labels = data.labels
        generator = torch.Generator().manual_seed(10_007 * (task.index + 1))
        new_samples = []
        for label in task.new_classes:
            members = torch.nonzero(labels == label).flatten()
            new_samples.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
        indices = torch.cat([self.memory.indices(), *new_samples])
        features = self.sample_features(indices).to(device)
        targets = labels[indices].to(device)

        head = IncrementalLinear(self.backbone.out_dim, task.num_seen_classes).to(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(10_009 * (task.index + 1))
            head._init_rows(0)
        optimizer = torch.optim.SGD(head.parameters(), lr=self.hparams.balance_lr, momentum=0.9, weight_decay=5e-4)
        milestones = self.hparams.balance_milestones
        milestones = [self.hparams.balance_epochs // 2] if milestones is None else milestones
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, 0.1)
        for _ in range(self.hparams.balance_epochs):
            order = torch.randperm(len(targets), generator=generator).to(device)
            for batch in order.split(128):
                loss = F.cross_entropy(head(features[batch]) / self.hparams.temperature, targets[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            scheduler.step()
        state = self.trainer.strategy.broadcast({k: v.cpu() for k, v in head.state_dict().items()})
        with torch.no_grad():
            self.head.weight.copy_(state["weight"])
            self.head.bias.copy_(state["bias"])

    # ------------------------------------------------------------------ checkpoints

    def architecture(self) -> dict[str, Any]:
        return {
            **super().architecture(),
            "extractors": len(self.backbone.extractors),
            "aux_classes": 0 if self.aux_head is None else self.aux_head.out_features,
            "num_old_classes": self.num_old_classes,
            "kept_channels": [
                None if kept is None else [k.tolist() for k in kept] for kept in self.backbone.kept_channels
            ],
            "template": self.backbone.template is not None,
            "gates": None if self.backbone.gates is None else self.backbone.gates.s_max,
            "pruning_history": self.pruning_history,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        arch = checkpoint["lightning_cil"]
        kept = arch.get("kept_channels", [None] * arch["extractors"])
        self.backbone.rebuild(kept, arch.get("template", False), arch.get("gates"))
        self.head = IncrementalLinear(self.backbone.out_dim).to(self.head.weight.device)
        if arch["aux_classes"]:
            self.aux_head = nn.Linear(self.backbone.newest_dim, arch["aux_classes"])
        self.num_old_classes = arch["num_old_classes"]
        self.exemplar_features.clear()
        super().on_load_checkpoint(checkpoint)
        self.pruning_history = list(arch.get("pruning_history", []))

    def num_parameters(self) -> int:
        """Parameters of the extractors and classifier (not the masks or the frozen template of the next task)."""
        extractors = sum(p.numel() for p in self.backbone.extractors.parameters())
        return extractors + sum(p.numel() for p in self.head.parameters())
