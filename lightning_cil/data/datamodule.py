"""The data side of a task stream: which samples belong to which task, and their loaders."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision.transforms import v2

from lightning_cil.data.batch_augmentation import BatchAugmentation, build_batch_augmentation
from lightning_cil.data.dali_decoding import DaliDecoder, DaliPlan, require_dali
from lightning_cil.data.datasets import (
    DATASETS,
    DatasetOptions,
    DatasetSplits,
    ImageSplit,
    dataset_channels,
    dataset_label,
    default_in_memory,
    image_tensor,
    load_dataset,
    splits_of_datasets,
)
from lightning_cil.data.device_decoding import EncodedBatch, collate_encoded, decode_batch
from lightning_cil.data.samplers import SeededShuffleSampler, ShardedEvalSampler
from lightning_cil.data.scenario import (
    DEFAULT_CLASS_ORDER_SEED,
    Scenario,
    StreamLayout,
    TaskInfo,
    build_layout,
    parse_protocol,
)
from lightning_cil.data.task_data import TrainingPlan
from lightning_cil.data.transforms import (
    DEFAULT_PRESET,
    build_transforms,
    runs_batchwise,
    transforms_for_data_config,
)
from lightning_cil.seeding import batch_augmentation_seed, run_seed, seed_sample

__all__ = ["DEVICE_DECODERS", "TaskDataset", "TaskStreamDataModule"]

#: decoders of ``decode_on_device``: the image codec's batched ``decode_jpeg`` + torchvision's transforms, or NVIDIA
#: DALI (the ``dali`` extra)
DEVICE_DECODERS = ("torchvision", "dali")


class TaskDataset(Dataset):
    """Samples of a split as ``(image, label, task)``: labels are stream labels (class-order positions). With
    ``with_index`` (the evaluation loaders) each sample also carries its split index, by which a method may cache
    what a frozen network computes on it (``methods/feature_cache.py``). With ``encoded`` (``decode_on_device``) a
    sample is ``(file bytes, label, task, augmentation seed, split index)``, decoded and transformed later."""

    def __init__(
        self, split: ImageSplit, indices: Tensor, labels: Tensor, tasks: Tensor, transform, with_index: bool = False
    ) -> None:
        self.split = split
        self.indices = indices
        self.labels = labels
        self.tasks = tasks
        self.transform = transform
        self.with_index = with_index
        self.encoded = False

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int, int] | tuple[Tensor, int, int, int]:
        seed = None
        if isinstance(key, tuple):  # (position, augmentation seed) from SeededShuffleSampler
            key, seed = key
            seed_sample(seed)
        j = int(self.indices[key])
        if self.encoded:  # evaluation and feature loaders give no seed: their transforms draw nothing
            return self.split.encoded(j), int(self.labels[j]), int(self.tasks[j]), seed or 0, j
        sample = self.transform(self.split.image(j)), int(self.labels[j]), int(self.tasks[j])
        return (*sample, j) if self.with_index else sample

    def __getitems__(self, keys: list) -> list[tuple]:
        """A loader's batch of keys at once. With the images in memory and an evaluation transform
        (``runs_batchwise``), the transform runs once on the stacked batch, with the numbers it gives image by
        image, instead of one Python call per image (evaluation, task-end features)."""
        batchwise = self.split.in_memory and not self.encoded and runs_batchwise(self.transform)
        if not batchwise or not keys or isinstance(keys[0], tuple):
            return [self[key] for key in keys]
        js = self.indices[torch.as_tensor(keys, dtype=torch.long)]
        columns = [self.transform(self.split.images[js]), self.labels[js].tolist(), self.tasks[js].tolist()]
        return list(zip(*columns, js.tolist())) if self.with_index else list(zip(*columns))


class TaskStreamDataModule(L.LightningDataModule):
    """Feeds a class-, task- or domain-incremental stream, one task at a time.

    The stream calls :meth:`set_task` before each task's fit and :meth:`train_on` at its start; the loaders then
    serve that task's training data (plus what the plan adds, e.g. a method's exemplars, minus what it excludes)
    and the test data of every task seen so far, each batch as ``(images, labels, task_ids)``.

    Args:
        dataset: one of ``digits``, ``cifar10``, ``cifar100``, ``imagenet100``, ``imagenet1000``, ``imagenet_r``,
            the pre-split benchmarks ``imagenet_a``, ``cub200``, ``objectnet``, ``omnibenchmark``, ``vtab``,
            ``imagefolder`` (``root/train/<class>``, ``root/test/<class>``) or ``domains``
            (``root/<domain>/<class>``, e.g. PACS); or a dataset object (a ``class_path``, e.g.
            ``torchvision.datasets.ImageFolder``): the train split, a map-style dataset of ``(image, label)``
            (see ``datasets.splits_of_datasets``).
        test_dataset: the test split when ``dataset`` is an object; without it ``test_fraction`` of every class of
            ``dataset`` is held out.
        root: dataset folder; not needed for ``digits``.
        scenario: ``class`` (task id unknown at test time), ``task`` (known; for ``domains`` each domain is a
            task with its own labels), or ``domain`` (same classes, one domain per task).
        protocol: preset such as ``B0_Inc10`` or ``B50_Inc10``; alternative to initial_classes/increment.
        initial_classes: classes of the first task.
        increment: classes per later task, or a list of the later tasks' sizes.
        class_order: explicit class order (indices or names); default: a permutation seeded by class_order_seed.
        class_order_seed: seed of that permutation (1993 in iCaRL, PyCIL and DER); None keeps the dataset's order.
        domains: domain folders to use, in task order (``domains`` dataset); default: all, sorted.
        imagenet_subset: ``podnet`` (PODNet/DER's ImageNet-100, default) or ``seed1993``.
        imagenet_r_split: ``coda`` (default: CODA-Prompt's fixed 24,000 / 6,000 split of the whole archive, the
            prompt papers' protocol) or ``folders`` (a pre-split copy's ``train/`` and ``test/``: RevisitingCIL,
            PILOT, RanPAC, EASE).
        augmentation: transform preset; default depends on the dataset (``imagenet`` for dataset objects), or on
            the backbone: a timm backbone's own input size, mean/std and interpolation.
        train_transforms: torchvision v2 transforms (``class_path`` entries) applied to each ``uint8 [C, H, W]``
            training image instead of the preset's; they must end in a float image (``ToDtype(torch.float32,
            scale=True)``, ``Normalize``). Checked on one image before training.
        test_transforms: the same for evaluation (and for the features of herding and class means).
        batch_size: training batch size per process.
        eval_batch_size: evaluation batch size per process (default: batch_size).
        num_workers: loader worker processes.
        pin_memory: page-locked batches for faster copies to the GPU; default: on when the accelerator is a GPU.
        persistent_workers: keep loader workers between epochs (no restart cost per epoch); default: on when the
            accelerator is a GPU and num_workers > 0. The bit-identical resume that the tests check is the CPU
            default (off).
        in_memory: decode every image once into memory; default on for small datasets.
        gpu_augmentation: the training loader yields ``uint8`` batches, and crop, flip, brightness and
            normalisation run batch-wise on the training device after the transfer (``on_after_batch_transfer``),
            with an independent draw per sample. Needs in-memory images and a preset of
            ``batch_augmentation.BATCH_PRESETS`` (the CIFAR and digits presets, ``none``). Draws come from one
            generator per (seed, epoch, rank), so a run with it is reproducible but not identical to one without.
        decode_on_device: for image files (ImageNet, ``imagefolder``, ``domains``) whose decoding limits the loader:
            the loaders (training, evaluation, task-end features) only read each file's bytes; the batch is decoded
            on the training device (TorchCodec's batched ``decode_jpeg``, nvJPEG on a GPU; ``data/image_codec.py``)
            and transformed there, each training image with its own seed as on the CPU path, before the transfer
            (``on_before_batch_transfer``; ``TaskData.map`` for task-end features). On the CPU the batches are
            identical to the default path's (and decoding leaves the workers for the main process: slower).
        device_decoder: the decoder of ``decode_on_device``: ``torchvision`` (default: the image codec decodes,
            torchvision's transforms run) or ``dali`` (NVIDIA DALI, the ``dali`` extra: ROI decoding, resize, flip and
            normalisation in one pipeline, ``num_workers`` CPU threads; the crops and flips are the CPU path's own
            draws; see ``data/dali_decoding.py``).
        max_train_per_class: keep at most this many training images per class (seeded); for quick runs.
        max_test_per_class: the same for test images.
        subset_seed: seed of those subsets.
        test_fraction: share held out as test set by datasets that have none (digits, domains).
        split_seed: seed of that hold-out split.
        download: let torchvision download CIFAR into root (needs internet).
        val_during_fit: run validation on the seen classes after every epoch of a fit (costs time).
    """

    def __init__(
        self,
        dataset: str | Dataset = "cifar100",
        test_dataset: Dataset | None = None,
        root: str | None = None,
        scenario: Scenario = "class",
        protocol: str | None = None,
        initial_classes: int | None = None,
        increment: int | list[int] | None = None,
        class_order: list[int | str] | None = None,
        class_order_seed: int | None = DEFAULT_CLASS_ORDER_SEED,
        domains: list[str] | None = None,
        imagenet_subset: str = "podnet",
        imagenet_r_split: str = "coda",
        augmentation: str | None = None,
        train_transforms: list[v2.Transform] | None = None,
        test_transforms: list[v2.Transform] | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        in_memory: bool | None = None,
        max_train_per_class: int | None = None,
        max_test_per_class: int | None = None,
        subset_seed: int = 0,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        download: bool = False,
        val_during_fit: bool = False,
        gpu_augmentation: bool = False,
        decode_on_device: bool = False,
        device_decoder: str = "torchvision",
    ) -> None:
        super().__init__()
        # dataset objects and transforms are described by name in the hyperparameters, not pickled into checkpoints
        self.save_hyperparameters(ignore=["dataset", "test_dataset", "train_transforms", "test_transforms"])
        objects = not isinstance(dataset, str)
        self.hparams["dataset"] = dataset_label(dataset) if objects else dataset
        if objects and not isinstance(dataset, Dataset):
            raise ValueError(f"dataset={dataset!r} must be a dataset name ({sorted(DATASETS)}) or a Dataset object.")
        if test_dataset is not None and not objects:
            raise ValueError(
                f"test_dataset is the test split of a dataset object; dataset={dataset!r} brings its own test split."
            )
        #: (train, test) dataset objects, or None for a named dataset
        self.dataset_objects: tuple[Dataset, Dataset | None] | None = (dataset, test_dataset) if objects else None
        if scenario not in ("class", "task", "domain"):
            raise ValueError(f"scenario={scenario!r} is unknown; choose 'class', 'task' or 'domain'.")
        if protocol is not None and (initial_classes is not None or increment is not None):
            raise ValueError(
                f"protocol={protocol!r} already sets initial_classes and increment; set either the protocol or "
                f"initial_classes/increment, not both."
            )
        if protocol is not None:
            parse_protocol(protocol)
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive.")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0.")
        #: image channels, known before any file is read (the CLI hands it to the model)
        self.num_channels = (
            image_tensor(dataset[0][0], f"sample 0 of {self.hparams.dataset}").shape[0]
            if objects
            else dataset_channels(dataset)
        )
        preset = augmentation or DEFAULT_PRESET.get(self.hparams.dataset, "imagenet")
        self.train_transform, self.test_transform = build_transforms(preset)
        if train_transforms is not None:
            self.train_transform = v2.Compose(list(train_transforms))
        if test_transforms is not None:
            self.test_transform = v2.Compose(list(test_transforms))
        #: the user chose the transforms (a preset or lists): a backbone's own data config does not replace them
        self.transforms_given = augmentation is not None or train_transforms is not None or test_transforms is not None
        #: keep decoded images in memory unless data.in_memory says otherwise (dataset objects: read through them)
        self.in_memory_default = False if objects else default_in_memory(dataset)
        #: the batch-wise training augmentation run on the device (``gpu_augmentation``), else None
        self.batch_augmentation: BatchAugmentation | None = None
        if gpu_augmentation:
            if train_transforms is not None:
                raise ValueError(
                    "data.gpu_augmentation runs a preset's augmentation batch-wise on the device; it cannot run "
                    "data.train_transforms. Set one of them."
                )
            if not (self.in_memory_default if in_memory is None else in_memory):
                raise ValueError(
                    f"data.gpu_augmentation needs the images in memory as one uint8 tensor; dataset="
                    f"{self.hparams.dataset!r} with in_memory={in_memory} reads files. Set in_memory: true (images "
                    f"of one size) or gpu_augmentation: false."
                )
            self.batch_augmentation = build_batch_augmentation(preset)
        if decode_on_device:
            held = "is held in memory" if (self.in_memory_default if in_memory is None else in_memory) else None
            held = "is a dataset object" if objects else held
            held = "runs gpu_augmentation (which needs it in memory)" if gpu_augmentation else held
            if held:
                raise ValueError(
                    f"data.decode_on_device decodes the training images' files on the device, but dataset="
                    f"{self.hparams.dataset!r} {held}; use it for image files (imagenet100, imagenet1000, imagenet_r,"
                    f" imagefolder, domains) with in_memory: false, or set decode_on_device: false."
                )
        if device_decoder not in DEVICE_DECODERS:
            raise ValueError(
                f"data.device_decoder={device_decoder!r} is unknown; choose one of {list(DEVICE_DECODERS)}."
            )
        if device_decoder == "dali":
            if not decode_on_device:
                raise ValueError(
                    "data.device_decoder='dali' is the decoder of decode_on_device: set decode_on_device: true."
                )
            require_dali()
        #: the DALI pipeline of ``device_decoder: dali``, built for the training device at the first batch
        self._dali: DaliDecoder | None = None
        self.current_task = -1
        self._splits: DatasetSplits | None = None
        self._layout: StreamLayout | None = None
        self._plan = TrainingPlan()

    # ------------------------------------------------------------------ the stream definition

    def prepare_stream(self) -> None:
        """Load the dataset and cut it into tasks (once). Raises on any bad stream definition."""
        if self._splits is not None:
            return
        hp = self.hparams
        options = DatasetOptions(
            hp.download, hp.imagenet_subset, hp.domains, hp.test_fraction, hp.split_seed, hp.imagenet_r_split
        )
        if self.dataset_objects is not None:
            splits = splits_of_datasets(*self.dataset_objects, options)
        else:
            splits = load_dataset(hp.dataset, hp.root, options)
        train = splits.train.limit_per_class(hp.max_train_per_class, hp.subset_seed)
        test = splits.test.limit_per_class(hp.max_test_per_class, hp.subset_seed + 1)
        keep_in_memory = self.in_memory_default if hp.in_memory is None else hp.in_memory
        if keep_in_memory:
            train, test = train.decoded(), test.decoded()
        layout = self._layout = build_layout(
            hp.scenario,
            splits.class_names,
            len(splits.domain_names),
            hp.protocol,
            hp.initial_classes,
            hp.increment,
            hp.class_order,
            hp.class_order_seed,
            dataset=hp.dataset,
        )
        self.class_order = list(layout.class_order)
        self._label_of_target = torch.tensor(layout.label_of_target, dtype=torch.long)
        self._splits = DatasetSplits(train, test, splits.class_names, splits.domain_names, splits.info)
        self._train_labels, self._train_tasks = self._labels_and_tasks(train)
        self._test_labels, self._test_tasks = self._labels_and_tasks(test)
        self.check_transforms()

    def use_backbone_defaults(self, data_config: dict[str, Any] | None) -> None:
        """Transforms for the backbone's own input (timm's data config: size, mean/std, interpolation) when the user
        chose none; the stream calls this before the first task (``None``: the backbone has no such config)."""
        if data_config is None or self.transforms_given:
            return
        self.train_transform, self.test_transform = transforms_for_data_config(data_config, self.num_channels)
        if self._splits is not None:
            self.check_transforms()

    def check_transforms(self) -> None:
        """Run the first training image through both pipelines: each must return a float image ``[C, H, W]``, and
        both the same shape (what the model sees in training and in evaluation)."""
        image = self.splits.train.image(0)
        shapes = {}
        for name, transform in (("train", self.train_transform), ("test", self.test_transform)):
            try:
                out = transform(image)
            except Exception as error:
                raise ValueError(
                    f"data.{name}_transforms fail on a uint8 image of shape {tuple(image.shape)}: "
                    f"{type(error).__name__}: {error}"
                ) from error
            if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.ndim != 3:
                found = (
                    f"a {out.dtype} tensor of shape {tuple(out.shape)}"
                    if isinstance(out, torch.Tensor)
                    else (f"a {type(out).__name__}")
                )
                raise ValueError(
                    f"data.{name}_transforms turn a uint8 image of shape {tuple(image.shape)} into {found}; they must "
                    f"return a float image [C, H, W]: end them with ToDtype(dtype: torch.float32, scale: true) and "
                    f"Normalize."
                )
            if out.shape[0] != self.num_channels:
                raise ValueError(
                    f"data.{name}_transforms turn a {self.num_channels}-channel image into {out.shape[0]} channels; "
                    f"the model is built for the data's {self.num_channels} channels."
                )
            shapes[name] = tuple(out.shape)
        if shapes["train"] != shapes["test"]:
            raise ValueError(
                f"data.train_transforms give images of shape {shapes['train']} but data.test_transforms give "
                f"{shapes['test']}; the model must see one input size in training and evaluation."
            )
        if self.hparams.device_decoder == "dali":
            DaliPlan.of(self.train_transform)  # refuses a step DALI cannot run, before training

    def _labels_and_tasks(self, split: ImageSplit) -> tuple[Tensor, Tensor]:
        """Stream label and task of every sample of ``split`` (called while the layout is being set up)."""
        layout = self._layout
        assert layout is not None
        if layout.by_domain:
            labels = split.groups * layout.domain_offset + split.targets
            return labels, split.groups.clone()
        labels = self._label_of_target[split.targets]
        return labels, torch.tensor(layout.task_of_label, dtype=torch.long)[labels]

    @property
    def layout(self) -> StreamLayout:
        """The stream's class order, tasks and label <-> task maps, built once."""
        self.prepare_stream()
        assert self._layout is not None
        return self._layout

    @property
    def splits(self) -> DatasetSplits:
        self.prepare_stream()
        assert self._splits is not None
        return self._splits

    @property
    def num_tasks(self) -> int:
        self.prepare_stream()
        return self.layout.num_tasks

    @property
    def num_classes(self) -> int:
        """Size of the label space over the whole stream."""
        self.prepare_stream()
        return self.layout.num_classes

    @property
    def class_names(self) -> list[str]:
        """Names of the stream labels, in label order."""
        names = self.splits.class_names
        if self.layout.domain_offset:
            return [f"{d}/{names[c]}" for d in self.splits.domain_names for c in range(len(names))]
        return [names[c] for c in self.class_order]

    def task_classes(self, task: int) -> list[int]:
        self.prepare_stream()
        return list(self.layout.task_classes[task])

    def task_info(self, task: int) -> TaskInfo:
        self.prepare_stream()
        return self.layout.task_info(task)

    def set_task(self, task: int) -> None:
        """Select ``task``; until :meth:`train_on` says otherwise, its fit trains on its own samples only."""
        self.task_info(task)  # validates the index
        self.current_task = task
        self._plan = TrainingPlan()

    def train_on(self, plan: TrainingPlan) -> None:
        """What the current task's fit trains on besides its own samples (the stream sets it at each fit start)."""
        self._plan = plan

    def describe(self) -> dict[str, Any]:
        """What defines this stream, recorded with the run and checked when a checkpoint is resumed."""
        self.prepare_stream()
        return {
            "dataset": self.hparams.dataset,
            "scenario": self.hparams.scenario,
            "class_order": list(self.class_order),
            "class_names": self.class_names,
            "task_classes": [list(c) for c in self.layout.task_classes],
            "train_samples": len(self.splits.train),
            "test_samples": len(self.splits.test),
            **self.splits.info,
        }

    # ------------------------------------------------------------------ datasets

    def _require_task(self) -> int:
        if self.current_task < 0:
            raise RuntimeError(
                "no task is selected: run the stream with `lightning-cil fit`, or pass a stream checkpoint "
                "(--ckpt_path) to validate/test."
            )
        return self.current_task

    def train_dataset(
        self, extra_indices: Tensor | None = None, all_seen: bool = False, exclude: Tensor | None = None
    ) -> TaskDataset:
        """The current task's training samples, plus ``extra_indices`` (exemplars) of the train split, minus
        ``exclude`` (samples a method holds out, e.g. BiC's bias-correction split)."""
        task = self._require_task()
        mask = self._train_tasks <= task if all_seen else self._train_tasks == task
        indices = torch.nonzero(mask).flatten()
        if extra_indices is not None and len(extra_indices):
            indices = torch.unique(torch.cat([indices, extra_indices.to(torch.long).cpu()]))
        if exclude is not None and len(exclude):
            indices = indices[~torch.isin(indices, exclude.to(torch.long).cpu())]
        return TaskDataset(self.splits.train, indices, self._train_labels, self._train_tasks, self.train_transform)

    def test_dataset(self, up_to_task: int | None = None) -> TaskDataset:
        """Test samples of every task up to the current one (or ``up_to_task``)."""
        task = self._require_task() if up_to_task is None else up_to_task
        indices = torch.nonzero(self._test_tasks <= task).flatten()
        return TaskDataset(self.splits.test, indices, self._test_labels, self._test_tasks, self.test_transform)

    def train_subset(self, indices: Tensor) -> TaskDataset:
        """Given train-split samples (e.g. exemplars) with the test-time transform."""
        self.prepare_stream()
        indices = torch.as_tensor(indices, dtype=torch.long)
        return TaskDataset(self.splits.train, indices, self._train_labels, self._train_tasks, self.test_transform)

    def train_labels(self) -> Tensor:
        """Stream label of every sample of the train split (index = train-split index)."""
        self.prepare_stream()
        return self._train_labels

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: str) -> None:
        self.prepare_stream()
        if self.hparams.decode_on_device and stage == "fit" and not self._on_gpu():
            rank_zero_warn(
                "data.decode_on_device without a GPU decodes in the main process instead of the loader workers "
                "(slower); it is meant for CUDA accelerators.",
                category=PossibleUserWarning,
            )

    def _loader(
        self, dataset: Dataset, batch_size: int, sampler, loader: type[DataLoader] = DataLoader, collate_fn=None
    ) -> DataLoader:
        workers = self.hparams.num_workers
        on_gpu = self._on_gpu()
        pin = on_gpu if self.hparams.pin_memory is None else self.hparams.pin_memory
        persistent = on_gpu if self.hparams.persistent_workers is None else self.hparams.persistent_workers
        return loader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=persistent and workers > 0,
            collate_fn=collate_fn,
        )

    def _on_gpu(self) -> bool:
        return self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)

    def _world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def train_dataloader(self) -> DataLoader:
        plan = self._plan
        dataset = self.train_dataset(plan.extra, all_seen=plan.all_seen, exclude=plan.exclude)
        if self.batch_augmentation is not None:
            dataset.transform = _keep_uint8  # augmented on the device, in on_after_batch_transfer
        dataset.encoded = self.hparams.decode_on_device  # decoded on the device, in on_before_batch_transfer
        world, rank = self._world()
        # A seeded distributed sampler even on one process: order and augmentations of epoch e are a
        # function of (seed, e), so a resumed run draws the same batches as an uninterrupted one.
        sampler = SeededShuffleSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=run_seed())
        if self.trainer is not None:
            # Lightning (2.5.3+, issue #21938) creates the loader's iterator before it sets the sampler's epoch;
            # loader workers prefetch at once, so a resumed run would redo epoch 0's order and augmentations.
            # Setting the epoch Lightning is about to set makes the first resumed epoch match.
            sampler.set_epoch(self.trainer.fit_loop.epoch_progress.current.processed)
        # Stateful: Lightning saves how far the epoch got in every checkpoint, and a fit resumed from one written
        # in the middle of an epoch (ModelCheckpoint's every_n_train_steps) continues at the next batch instead of
        # starting the epoch's data over while counting on from the saved step.
        collate = collate_encoded if dataset.encoded else None
        return self._loader(dataset, self.hparams.batch_size, sampler, StatefulDataLoader, collate)

    def _eval_loader(self) -> DataLoader:
        dataset = self.test_dataset()
        dataset.with_index = True  # batches are (images, labels, tasks, test-split indices)
        dataset.encoded = self.hparams.decode_on_device  # decoded on the device, in on_before_batch_transfer
        world, rank = self._world()
        sampler = ShardedEvalSampler(dataset, num_replicas=world, rank=rank)
        collate = collate_encoded if dataset.encoded else None
        return self._loader(
            dataset, self.hparams.eval_batch_size or self.hparams.batch_size, sampler, collate_fn=collate
        )

    def val_dataloader(self) -> DataLoader | list:
        fitting = self.trainer is not None and self.trainer.state.fn == "fit"
        if fitting and not self.hparams.val_during_fit:
            return []
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``decode_on_device``: decode and transform a batch of file bytes on the training device (an
        evaluation batch with the test transform, keeping its test-split indices)."""
        if not isinstance(batch, EncodedBatch):
            return batch
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if self.trainer is not None and not self.trainer.training:
            return *decode_batch(batch, self.test_transform, device, self.splits.test.image), batch.indices
        if self.hparams.device_decoder == "dali":
            if self._dali is None or self._dali.device != device:
                plan = DaliPlan.of(self.train_transform)
                self._dali = DaliDecoder(plan, device, self.hparams.batch_size, max(1, self.hparams.num_workers))
            return self._dali(batch, self.splits.train.image)
        return decode_batch(batch, self.train_transform, device, self.splits.train.image)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``gpu_augmentation``: augment and normalise a training batch (``uint8``) on its device."""
        images, *rest = batch
        if self.batch_augmentation is None or images.dtype != torch.uint8:
            return batch
        return self.batch_augmentation(images, self._generator(images.device)), *rest

    def _generator(self, device: torch.device) -> torch.Generator:
        """The batch augmentation's generator, seeded by (seed, epoch, batch, rank) for each training batch, so a
        run resumed at any batch draws what an uninterrupted one did."""
        epoch, batch = 0, 0
        if self.trainer is not None:
            epoch = self.trainer.current_epoch
            batch = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready  # this batch's index, 0-based
        _, rank = self._world()
        return torch.Generator(device=device).manual_seed(batch_augmentation_seed(epoch, batch, rank))

    def state_dict(self) -> dict[str, Any]:
        return {"current_task": self.current_task}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        task = int(state_dict.get("current_task", -1))
        if task >= self.num_tasks:
            raise ValueError(
                f"the checkpoint is at task {task} but this data configuration has only {self.num_tasks} tasks."
            )
        self.current_task = task


def _keep_uint8(image: Tensor) -> Tensor:
    """The training transform under ``gpu_augmentation``: the image as stored (uint8), augmented later."""
    return image
