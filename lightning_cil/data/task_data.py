"""What passes between the stream, the data module and a method's task hooks.

The stream is the broker: before each fit it tells the data module what to train on (a :class:`TrainingPlan` it
builds from what the method asks for), and it hands the method's task hooks a :class:`TaskData`, a view of the
stream's data. Neither the method nor the data module reaches through the trainer for the other.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.strategies import Strategy
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_cil.data.device_decoding import collate_encoded, decode_batch
from lightning_cil.data.samplers import ShardedEvalSampler
from lightning_cil.data.scenario import TaskInfo

if TYPE_CHECKING:
    from lightning_cil.data.datamodule import TaskDataset, TaskStreamDataModule

__all__ = ["TaskData", "TrainingPlan"]


@dataclass(frozen=True)
class TrainingPlan:
    """What the next fit trains on, besides the current task's samples.

    Args:
        extra: train-split indices added to the task's samples (a rehearsal method's exemplars).
        exclude: train-split indices left out (e.g. BiC's held-out split for its bias correction).
        all_seen: train on every task seen so far instead of the current one only (Joint).
    """

    extra: Tensor | None = None
    exclude: Tensor | None = None
    all_seen: bool = False


class TaskData:
    """The stream's data as a task hook sees it (``IncrementalModule.task_data``).

    Args:
        info: the task.
        datamodule: the stream's data module.
        strategy: the trainer's strategy: the device, this process's rank and the gathering of shards.
    """

    def __init__(self, info: TaskInfo, datamodule: TaskStreamDataModule, strategy: Strategy) -> None:
        self.info = info
        self._datamodule = datamodule
        self._strategy = strategy

    @property
    def labels(self) -> Tensor:
        """Stream label of every sample of the train split (index = train-split index)."""
        return self._datamodule.train_labels()

    def members(self, label: int) -> Tensor:
        """Train-split indices of ``label``'s samples, in split order."""
        return torch.nonzero(self.labels == label).flatten()

    def subset(self, indices: Tensor) -> TaskDataset:
        """Given train-split samples (e.g. exemplars) with the test-time transform."""
        return self._datamodule.train_subset(indices)

    def training_set(self) -> TaskDataset:
        """The task's own training samples (no exemplars), with the training transform."""
        return self._datamodule.train_dataset()

    @property
    def test_split(self) -> object:
        """The test split the evaluation loaders' sample indices refer to (what a feature cache is tied to)."""
        return self._datamodule.splits.test

    @property
    def batch_size(self) -> int:
        """The training batch size per process."""
        return self._datamodule.hparams.batch_size

    @property
    def device(self) -> torch.device:
        """The device this process trains on."""
        return self._strategy.root_device

    def shard_loader(self, dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
        """This process's shard of ``dataset``, in order (every sample once over all processes)."""
        sampler = ShardedEvalSampler(dataset, self._strategy.world_size, self._strategy.global_rank)
        return DataLoader(dataset, batch_size, sampler=sampler, num_workers=num_workers)

    def map(self, fn: Callable[[Tensor], Tensor], dataset: Dataset, dim: int, batch_size: int = 256) -> Tensor:
        """``fn`` (images on :attr:`device` -> ``[batch, dim]`` rows) over every sample of ``dataset``, in dataset
        order, on the CPU. Each process computes its shard and the shards are gathered, so every process returns
        the identical tensor. Under ``decode_on_device`` the files are decoded and transformed on the device."""
        from lightning_cil.data.datamodule import TaskDataset  # (the data module imports this module)

        device = self.device
        world = self._strategy.world_size
        workers = self._datamodule.hparams.num_workers
        if self._datamodule.hparams.decode_on_device and isinstance(dataset, TaskDataset):
            # the loader reads the files' bytes; each batch is decoded and transformed on the device
            dataset = copy.copy(dataset)
            dataset.encoded = True
            sampler = ShardedEvalSampler(dataset, world, self._strategy.global_rank)
            loader = DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_encoded)
            batches = (decode_batch(batch, dataset.transform, device, dataset.split.image)[0] for batch in loader)
        else:
            batches = (images.to(device) for images, _, _ in self.shard_loader(dataset, batch_size, workers))
        parts = [fn(images) for images in batches]
        local = torch.cat(parts) if parts else torch.zeros(0, dim, device=device)
        if world == 1:
            return local.cpu()
        n, per_rank = len(dataset), math.ceil(len(dataset) / world)  # type: ignore[arg-type]
        padded = torch.zeros(per_rank, local.shape[1], device=device)
        padded[: len(local)] = local
        gathered = self._strategy.all_gather(padded).cpu()  # [world, per_rank, d]
        features = torch.empty(n, local.shape[1])
        for r in range(world):
            positions = torch.arange(r, n, world)
            features[positions] = gathered[r, : len(positions)]
        return features
