"""Samplers for distributed evaluation."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler

from lightning_cil.seeding import augmentation_seed

__all__ = ["SeededShuffleSampler", "ShardedEvalSampler", "augmentation_seed"]


class ShardedEvalSampler(DistributedSampler):
    """Every sample exactly once over all ranks, in order (rank r gets r, r + world, ...).

    Lightning's default distributed sampler pads the last shard with repeated samples, which biases
    accuracy counts; summing per-rank counts over these shards gives the single-process numbers.
    Subclassing ``DistributedSampler`` tells Lightning not to replace it.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))  # type: ignore[arg-type]
        self.total_size = len(dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class SeededShuffleSampler(DistributedSampler):
    """Shuffles like ``DistributedSampler`` and pairs every index with its own augmentation seed.

    The dataset seeds the CPU generator with it before transforming the sample, so the random
    augmentations of epoch e are a function of (seed, e, sample): identical whatever the number of
    loader workers, and identical after a resume (Lightning creates the loader iterator, which draws
    from the global generator, at different moments in a restarted and in a running fit).
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        for index in super().__iter__():
            yield index, augmentation_seed(self.seed, self.epoch, index)
