"""The derived seeds are pinned: a change here changes every run's draws (and every resume would diverge)."""

import random

import numpy as np
import torch

from lightning_cil.data.samplers import SeededShuffleSampler
from lightning_cil.seeding import (
    TASK_START,
    TRAIN_BATCH,
    TRAIN_EPOCH,
    augmentation_seed,
    batch_augmentation_seed,
    reseed,
    run_seed,
    stream_seed,
)


def test_run_seed_is_what_seed_everything_set(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert run_seed() == 0
    monkeypatch.setenv("PL_GLOBAL_SEED", "1993")
    assert run_seed() == 1993


def test_reseed_sets_every_global_rng_from_the_stream_position(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    reseed(TASK_START, 3)
    assert torch.initial_seed() == 689_067_507  # ((5 * 1_000_003 + 1) * 1_000_003 + 3) mod 2^32
    drawn = (random.random(), np.random.rand(), torch.rand(1).item())
    reseed(TRAIN_EPOCH, 0)
    reseed(TASK_START, 3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == drawn
    reseed(TRAIN_BATCH, 2, 3)  # before the step of batch 3 of epoch 2
    assert torch.initial_seed() == 757_341_547 == stream_seed(5, TRAIN_BATCH, 2, 3)


def test_sample_and_rank_seeds_depend_only_on_seed_epoch_and_index(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    assert batch_augmentation_seed(epoch=2, batch=3, rank=1) == 9_057_412_531_593_792_148
    assert batch_augmentation_seed(2, 3, 1) == augmentation_seed(stream_seed(5, 3), 2, -2)
    sampler = SeededShuffleSampler(range(6), num_replicas=1, rank=0, shuffle=True, seed=5)
    sampler.set_epoch(2)
    assert all(seed == augmentation_seed(5, 2, index) for index, seed in sampler)
