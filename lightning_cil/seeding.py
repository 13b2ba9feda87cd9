"""The run seed and every seed derived from it, in one place.

A stream's randomness is a function of its position (task, epoch, sample, rank), never of what ran before in the
process: a resumed run then draws exactly what an uninterrupted one did, whatever the number of loader workers.

- :func:`run_seed`: the seed of the run (``seed_everything``, which Lightning exports as ``PL_GLOBAL_SEED``).
- :func:`reseed`: every global RNG from (run seed, phase, which): the stream calls it at each task start
  (:data:`TASK_START`, task), each training epoch start (:data:`TRAIN_EPOCH`, epoch) and each training batch
  (:data:`TRAIN_BATCH`, epoch, batch): a run resumed in the middle of an epoch draws what an uninterrupted one did
  from its next batch on.
- :func:`augmentation_seed`: the seed of one sample's augmentation in one epoch (the loader's sampler pairs it
  with the index; :func:`seed_sample` applies it in the dataset). Negative indices are the per-batch, per-rank
  generators of the batch-wise device augmentation (:func:`batch_augmentation_seed`).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = [
    "TASK_START",
    "TRAIN_BATCH",
    "TRAIN_EPOCH",
    "augmentation_seed",
    "batch_augmentation_seed",
    "reseed",
    "run_seed",
    "seed_sample",
    "stream_seed",
]

#: phase of :func:`reseed` before a task's ``on_task_start``
TASK_START = 1
#: phase of :func:`reseed` at the start of every training epoch
TRAIN_EPOCH = 2
#: phase of :func:`reseed` before every training batch's step
TRAIN_BATCH = 3


def run_seed() -> int:
    """The run's seed: what ``seed_everything`` set (0 when nothing did)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def stream_seed(*parts: int) -> int:
    """A 32-bit seed that is a function of ``parts`` only (run seed, phase, index)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**32)
    return seed


def reseed(phase: int, *index: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs from (run seed, ``phase``, ``index``)."""
    seed = stream_seed(run_seed(), phase, *index)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that is a function of (run seed, epoch, sample) only."""
    return ((seed * 1_000_003 + epoch) * 2_654_435_761 + index) % (2**63 - 1)


def batch_augmentation_seed(epoch: int, batch: int, rank: int) -> int:
    """The seed of rank ``rank``'s device-augmentation generator for batch ``batch`` of ``epoch`` (negative
    "index": apart from the sample seeds)."""
    return augmentation_seed(stream_seed(run_seed(), batch), epoch, -1 - rank)


def seed_sample(seed: int) -> None:
    """Seed the generator that the CPU transforms draw from, before one sample is transformed."""
    torch.default_generator.manual_seed(seed)
