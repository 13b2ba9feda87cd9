"""Features of frozen networks, computed once per image: on the test images (every later evaluation reuses them) and
on the training samples a method keeps (DER's exemplars under its final extractors, at every later task end).

A stream evaluates every seen task after every task, so without a cache task t's test images pass through the
network T - t times. Where the network that computes some features is frozen (a pre-trained model's ViT, an adapted
model after its first task, the query pass of the prompt methods), those features cannot change: the cache keeps
them by test-split index (the test loader yields it with each image) and computes only the images it has not seen.
Each rank caches its own shard. The cache is tied to one test split (the stream's) and emptied when the network
changes (a training task, a restored checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["FrozenFeatureCache", "SampleFeatureBank"]


class FrozenFeatureCache:
    """Rows of frozen features by test-split index, one table per name."""

    def __init__(self) -> None:
        self._tables: dict[str, tuple[Tensor, Tensor]] = {}
        self._split: object | None = None

    def clear(self) -> None:
        self._tables = {}

    def forget(self, name: str) -> None:
        """Drop one table (its network is about to change)."""
        self._tables.pop(name, None)

    def bind(self, split: object) -> None:
        """Use the cache for ``split`` (the test split the indices refer to); another split empties it."""
        if split is not self._split:
            self.clear()
            self._split = split

    def __len__(self) -> int:
        """Cached rows over all tables."""
        return sum(int(known.sum()) for _, known in self._tables.values())

    def lookup(self, name: str, ids: Tensor, images: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        """``compute(images)``, with the rows of images cached under ``name`` taken from the cache (``ids``: their
        test-split indices) and only the others computed (then cached)."""
        ids = ids.to(images.device, torch.long)
        rows, known = self._tables.get(name, (None, None))
        size = int(ids.max()) + 1 if len(ids) else 0
        if rows is not None and len(rows) < size:
            grown = rows.new_zeros(size, *rows.shape[1:])
            grown[: len(rows)] = rows
            seen = known.new_zeros(size)
            seen[: len(known)] = known
            rows, known = grown, seen
        missing = torch.ones(len(ids), dtype=torch.bool, device=images.device) if rows is None else ~known[ids]
        if missing.any():
            fresh = compute(images[missing] if not missing.all() else images)
            if rows is None:
                rows = fresh.new_zeros(size, *fresh.shape[1:])
                known = torch.zeros(size, dtype=torch.bool, device=images.device)
            rows[ids[missing]] = fresh.to(rows.dtype)
            known[ids[missing]] = True
        self._tables[name] = (rows, known)
        return rows[ids]


class SampleFeatureBank:
    """Rows of frozen features by train-split index, one table per name, for the samples a method keeps.

    DER's task ends featurise its exemplars and the new classes' images under every extractor; the old extractors
    are final, so their features of an exemplar are those of the last task end. The bank keeps them, and
    :meth:`keep` drops all but the exemplars after each memory update, so it holds at most memory x extractors
    rows. Every rank holds the same rows (task-end features are gathered over the ranks). It is not saved in
    checkpoints: a resumed run computes the rows again, with the same numbers.
    """

    def __init__(self) -> None:
        self._tables: dict[str, tuple[Tensor, Tensor]] = {}  # name -> (sorted indices, rows)

    def clear(self) -> None:
        self._tables = {}

    def forget(self, name: str) -> None:
        """Drop one table (its network is about to change)."""
        self._tables.pop(name, None)

    def __len__(self) -> int:
        """Rows over all tables."""
        return sum(len(ids) for ids, _ in self._tables.values())

    def missing(self, name: str, ids: Tensor) -> Tensor:
        """A mask of the ``ids`` that ``name`` holds no row for."""
        table = self._tables.get(name)
        return torch.ones(len(ids), dtype=torch.bool) if table is None else ~torch.isin(ids, table[0])

    def store(self, name: str, ids: Tensor, rows: Tensor) -> None:
        """Add the rows of samples ``ids`` (not held yet) to ``name``."""
        if name in self._tables:
            held, held_rows = self._tables[name]
            ids, rows = torch.cat([held, ids]), torch.cat([held_rows, rows])
        order = torch.argsort(ids)
        self._tables[name] = (ids[order], rows[order])

    def rows(self, name: str, ids: Tensor) -> Tensor:
        """The rows of ``ids``, in their order; every one must be held."""
        held, rows = self._tables[name]
        return rows[torch.searchsorted(held, ids)]

    def keep(self, ids: Tensor) -> None:
        """Drop the rows of every sample but ``ids`` (the memory after its update)."""
        for name, (held, rows) in self._tables.items():
            kept = torch.isin(held, ids)
            self._tables[name] = (held[kept], rows[kept])
