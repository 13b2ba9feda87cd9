"""Samplers for distributed evaluation."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler

__all__ = ["ShardedEvalSampler"]


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
