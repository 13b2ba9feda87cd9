"""Shared fixtures: real datasets from ../shared/data (extracted once per session) and tiny trainers."""

from __future__ import annotations

import os

# Spin-waiting OpenMP threads halve CPU throughput on small machines; must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import tarfile
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _extract(tmp_path_factory: pytest.TempPathFactory, archive: Path, name: str) -> Path:
    if not archive.is_file():
        pytest.skip(f"real-data test needs {archive.name} from the shared data folder ({archive}); it is absent here")
    dest = tmp_path_factory.mktemp(name)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(dest, filter="data")
    return dest


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIFAR-10 as an ImageFolder tree (train/<class>, test/<class>), extracted once per session."""
    return _extract(tmp_path_factory, SHARED_DATA / "cifar10" / "cifar10-jpg.tar.gz", "cifar10")


@pytest.fixture(scope="session")
def pacs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PACS at 64px: <domain>/<class>/*.jpg, extracted once per session."""
    return _extract(tmp_path_factory, SHARED_DATA / "pacs" / "pacs-64px-jpg.tar.gz", "pacs")


def make_trainer(root: Path, **overrides) -> L.Trainer:
    """A quiet, deterministic CPU trainer writing into ``root``."""
    options = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=str(root),
        logger=CSVLogger(str(root), name="run", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        log_every_n_steps=5,
    )
    options.update(overrides)
    return L.Trainer(**options)
