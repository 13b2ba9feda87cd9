"""Shared fixtures: real datasets from ../shared/data (extracted once per session) and tiny trainers."""

from __future__ import annotations

import os

# Spin-waiting OpenMP threads halve CPU throughput on small machines; must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the installed `lightning-cil` command (as users do) from the repository root."""
    exe = shutil.which("lightning-cil")
    command = [exe] if exe else [sys.executable, "-m", "lightning_cil"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """``lightning-cil *args`` in this process: the console entry point without a new interpreter's start-up (about
    10 s on 2 cores), for checks that stop before or soon after training starts."""
    from lightning_cil.cli import main

    monkeypatch.setattr(sys, "argv", ["lightning-cil"])
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def assert_one_line(out: subprocess.CompletedProcess, message: str) -> None:
    """Exit 2 and the error as the last line of stderr, alone (Lightning's own start-up notices may precede it)."""
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("lightning-cil: error: ")]
    assert errors == lines[-1:] and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert re.search(message, errors[0]), errors[0]


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
def cifar10_small_root(cifar10_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 40 training and 20 test images of every CIFAR-10 class, in the same train/ and test/ layout (for
    dataset objects that list every file of their folder when they are built)."""
    root = tmp_path_factory.mktemp("cifar10_small")
    for split, count in (("train", 40), ("test", 20)):
        for folder in sorted((cifar10_root / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:count]:
                shutil.copyfile(image, root / split / folder.name / image.name)
    return root


#: the project's own small ViT and its weights, pre-trained on five CIFAR-10 classes (configs/backbone_vit_cifar10.yaml)
WEIGHTS = REPO / "weights" / "vit_micro_patch8_32.cifar10_5cls.safetensors"
BACKBONE = "vit_micro_patch8_32"
#: the CIFAR-10 classes that backbone never saw
UNSEEN = ("dog", "frog", "horse", "ship", "truck")


@pytest.fixture(scope="session")
def unseen_root(cifar10_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CIFAR-10 classes the small ViT was not pre-trained on, as an ImageFolder tree of links."""
    root = tmp_path_factory.mktemp("cifar10_unseen")
    for split in ("train", "test"):
        (root / split).mkdir()
        for name in UNSEEN:
            (root / split / name).symlink_to(cifar10_root / split / name, target_is_directory=True)
    return root


def unseen_stream(root: Path, initial: int = 3, increment: int = 2, **overrides):
    """The offline stream of the pre-trained-model methods: the unseen classes in 2 tasks (3 + 2), 100 training and
    50 test images each, at 32 px with the CIFAR-10 preset (the backbone's pre-training input)."""
    from lightning_cil import TaskStreamDataModule

    options = dict(
        dataset="imagefolder",
        root=str(root),
        augmentation="cifar10",
        initial_classes=initial,
        increment=increment,
        class_order_seed=None,
        max_train_per_class=100,
        max_test_per_class=50,
        batch_size=32,
        num_workers=0,
    )
    options.update(overrides)
    return TaskStreamDataModule(**options)


@pytest.fixture(scope="session")
def pacs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PACS at 64px: <domain>/<class>/*.jpg, extracted once per session."""
    return _extract(tmp_path_factory, SHARED_DATA / "pacs" / "pacs-64px-jpg.tar.gz", "pacs")


def digits_stream(scenario: str = "class", **overrides):
    """The digits stream of the method tests: 3 tasks (4, 3, 3 classes) in natural order, in-process loading."""
    from lightning_cil import TaskStreamDataModule

    options = dict(
        dataset="digits",
        scenario=scenario,
        initial_classes=4,
        increment=3,
        class_order_seed=None,
        batch_size=64,
        num_workers=0,
    )
    options.update(overrides)
    return TaskStreamDataModule(**options)


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


class CrashAtEpoch(L.Callback):
    """Simulates a killed job at the start of a given (global) epoch."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


class CrashAtStep(L.Callback):
    """Simulates a job killed in the middle of an epoch: before the training step of (global) step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


#: The Split CIFAR-10 configs shrunk for a CPU: 200 train / 100 test images per class, ResNet-20, 6 epochs per task.
SPLIT_CIFAR10_OVERRIDES = (
    "--seed_everything",
    "0",
    "--data.max_train_per_class",
    "200",
    "--data.max_test_per_class",
    "100",
    "--data.num_workers",
    "0",
    "--model.init_args.backbone",
    "resnet20",
    "--model.init_args.schedule",
    "{epochs: 6, lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4, milestones: [4]}",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.deterministic",
    "true",
)


@pytest.fixture(scope="session")
def split_cifar10(cifar10_root, tmp_path_factory):
    """``run(method)`` -> metrics.json of configs/<method>_cifar10.yaml, shrunk; each method runs once per session.
    ``run.run_dir(method)`` is that run's log folder (config.yaml, checkpoints/)."""
    cache: dict[str, dict] = {}
    run_dirs: dict[str, Path] = {}

    def run(method: str) -> dict:
        if method not in cache:
            out_dir = tmp_path_factory.mktemp(f"split_cifar10_{method}")
            out = cli(
                "fit",
                "--config",
                str(REPO / "configs" / f"{method}_cifar10.yaml"),
                "--data.root",
                str(cifar10_root),
                *SPLIT_CIFAR10_OVERRIDES,
                "--trainer.default_root_dir",
                str(out_dir),
                "--trainer.logger.init_args.save_dir",
                str(out_dir),
            )
            assert out.returncode == 0, out.stderr[-3000:]
            (metrics,) = out_dir.glob(f"{method}_cifar10/version_*/metrics.json")
            cache[method] = json.loads(metrics.read_text())
            run_dirs[method] = metrics.parent
        return cache[method]

    def run_dir(method: str) -> Path:
        run(method)
        return run_dirs[method]

    run.run_dir = run_dir
    return run
