"""The task loop: forgetting on real data, resume, refusal of incompatible checkpoints."""

import json
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CrashAtEpoch, CrashAtStep, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_cil import DER, Finetune, ICaRL, Joint, TaskSchedule, TaskStreamDataModule, run_stream
from lightning_cil.stream import StreamInterrupted, last_checkpoint


def _digits_stream(**kw) -> TaskStreamDataModule:
    options = dict(
        dataset="digits", initial_classes=4, increment=3, class_order_seed=None, batch_size=64, num_workers=0
    )
    options.update(kw)
    return TaskStreamDataModule(**options)


def _model(cls=Finetune, epochs: int = 3, backbone: str = "resnet20") -> Finetune:
    return cls(backbone=backbone, in_channels=1, schedule=TaskSchedule(epochs=epochs, lr=0.02, milestones=[]))


def _metrics(root: Path) -> dict:
    return json.loads((root / "run" / "version_0" / "metrics.json").read_text())


def _pruned_der() -> DER:
    """DER with channel masks: a checkpoint mid-task holds the masks, one at a task end the pruned shapes."""
    schedule = TaskSchedule(epochs=3, lr=0.05, milestones=[])
    return DER(backbone="resnet20", in_channels=1, schedule=schedule, memory_budget=40, prune=True, balance_epochs=2)


def _run(root: Path, seed: int = 5, crash_at: int | None = None, ckpt_path=None, method=_model, callbacks=(), **data):
    L.seed_everything(seed)
    model, dm = method(), _digits_stream(**data)
    callbacks = [*callbacks, *([CrashAtEpoch(crash_at)] if crash_at is not None else [])]
    trainer = make_trainer(root, callbacks=callbacks)
    run_stream(trainer, model, dm, ckpt_path=ckpt_path)
    return model


def test_stream_writes_matrix_checkpoints_and_metrics(tmp_path):
    model = _run(tmp_path)
    metrics = _metrics(tmp_path)
    matrix = metrics["scorers"]["cnn"]["accuracy_matrix"]
    assert len(matrix) == 3 and all(v is not None for v in matrix[2])
    assert matrix[0][1] is None  # upper triangle is never measured
    assert [t["classes_seen"] for t in metrics["tasks"]] == [4, 7, 10]
    assert metrics["stream"]["task_classes"] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    ckpts = sorted(p.name for p in (tmp_path / "run" / "version_0" / "checkpoints").iterdir())
    assert {"task00.ckpt", "task01.ckpt", "task02.ckpt", "last.ckpt"} <= set(ckpts)
    assert model.head.out_features == 10 and model.task_index == 2
    summary = metrics["summary"]
    assert summary["avg_incremental_accuracy"] == pytest.approx(
        sum(metrics["scorers"]["cnn"]["accuracy_seen"]) / 3, abs=1e-3
    )


@pytest.mark.parametrize(
    "method", [_model, pytest.param(_pruned_der, marks=pytest.mark.slow)], ids=["Finetune", "DER-pruned"]
)
@pytest.mark.parametrize(("crash_at", "where"), [(4, "mid-task"), (6, "task boundary")])
def test_resumed_stream_ends_like_an_uninterrupted_one(tmp_path, crash_at, where, method):
    # 3 tasks x 3 epochs: epoch 4 is inside task 1; epoch 6 is the first epoch of task 2, so the newest
    # checkpoint then is the one written after task 1 ended.
    reference = _run(tmp_path / "reference", method=method)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "killed", crash_at=crash_at, method=method)
    last = tmp_path / "killed" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=False)["callbacks"]["TaskStream"]
    assert state["completed_task"] == (0 if crash_at == 4 else 1), where
    resumed = _run(tmp_path / "resumed", ckpt_path=last, method=method)
    expected = _metrics(tmp_path / "reference")["scorers"]["cnn"]["accuracy_matrix"]
    assert _metrics(tmp_path / "resumed")["scorers"]["cnn"]["accuracy_matrix"] == expected
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resuming at the {where}"


@pytest.mark.parametrize(
    "persistent", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["workers", "persistent-workers"]
)
def test_resume_with_loader_workers_draws_the_epoch_it_stopped_at(tmp_path, persistent):
    """Loader workers prefetch as soon as Lightning creates the iterator, before it sets the sampler's epoch; the
    first resumed epoch must still get its own order and augmentations, not epoch 0's."""
    data = dict(num_workers=2, persistent_workers=persistent)
    reference = _run(tmp_path / "reference", **data)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "killed", crash_at=4, **data)
    last = tmp_path / "killed" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    resumed = _run(tmp_path / "resumed", ckpt_path=last, **data)
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resuming with loader workers"


@pytest.mark.parametrize(
    "data",
    [dict(num_workers=0), dict(num_workers=2), dict(num_workers=0, gpu_augmentation=True)],
    ids=["in-process", "workers", "device-augmentation"],
)
def test_a_checkpoint_written_mid_epoch_resumes_at_the_next_batch(tmp_path, data):
    """Step-interval checkpoints (ModelCheckpoint's every_n_train_steps) of a long epoch: the training loader is
    stateful, so a fit resumed from one continues with the batch after it, not with the epoch's first batches;
    the device augmentation and the step's own randomness are seeded per batch, so they draw what they did."""
    reference = _run(tmp_path / "reference", **data)
    every_steps = ModelCheckpoint(every_n_train_steps=5, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "killed", callbacks=[every_steps, CrashAtStep(17)], **data)
    last = tmp_path / "killed" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    loop = checkpoint["loops"]["fit_loop"]
    done = loop["epoch_loop.batch_progress"]["current"]["completed"]
    assert checkpoint["global_step"] == 15 and done > 0, "the test needs a checkpoint from inside an epoch"
    assert loop["state_dict"]["combined_loader"], "the training loader's position is in the checkpoint"
    resumed = _run(tmp_path / "resumed", ckpt_path=last, **data)
    expected = _metrics(tmp_path / "reference")["scorers"]["cnn"]["accuracy_matrix"]
    assert _metrics(tmp_path / "resumed")["scorers"]["cnn"]["accuracy_matrix"] == expected
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resuming in the middle of an epoch"


class _SigtermAtStep(L.Callback):
    """A preemption in the middle of an epoch: SIGTERM to this process before the training step of ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_sigterm_mid_epoch_leaves_a_checkpoint_at_its_step_that_resumes_identically(tmp_path):
    """Without step-interval checkpoints, a stream stopped by SIGTERM used to resume from the last epoch end and
    train that epoch's first steps again; now it saves last.ckpt at the step where Lightning stops the fit."""
    reference = _run(tmp_path / "reference")
    with pytest.raises(StreamInterrupted) as stop:
        _run(tmp_path / "stopped", callbacks=[_SigtermAtStep(13)])
    assert stop.value.code == 128 + signal.SIGTERM
    last = tmp_path / "stopped" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    done = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"]
    assert checkpoint["global_step"] == 14 and done == 5, "the running step ends (9 an epoch), then the fit stops"
    resumed = _run(tmp_path / "resumed", ckpt_path=last)
    expected = _metrics(tmp_path / "reference")["scorers"]["cnn"]["accuracy_matrix"]
    assert _metrics(tmp_path / "resumed")["scorers"]["cnn"]["accuracy_matrix"] == expected
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resuming from the SIGTERM's checkpoint"


def test_checkpoint_from_another_stream_is_refused(tmp_path):
    _run(tmp_path / "a")
    last = tmp_path / "a" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    L.seed_everything(5)
    other = _digits_stream(initial_classes=2, increment=2)
    with pytest.raises(
        ValueError, match=r"cannot resume from .*task_classes=\[\[0, 1, 2, 3\].*this configuration gives \[\[0, 1\]"
    ):
        run_stream(make_trainer(tmp_path / "b"), _model(), other, ckpt_path=last)
    with pytest.raises(ValueError, match=r"epochs per task \[3, 3, 3\] but this configuration gives \[5, 5, 5\]"):
        run_stream(make_trainer(tmp_path / "c"), _model(epochs=5), _digits_stream(), ckpt_path=last)
    with pytest.raises(
        ValueError, match=r"checkpoint mismatch: it holds method='lightning_cil.methods.finetune.Finetune'"
    ):
        run_stream(make_trainer(tmp_path / "d"), _model(Joint), _digits_stream(), ckpt_path=last)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path='nope.ckpt' does not exist; give a checkpoint file"):
        run_stream(make_trainer(tmp_path), _model(), _digits_stream(), ckpt_path="nope.ckpt")
    with pytest.raises(FileNotFoundError, match="ckpt_path='best' does not exist; .* or 'last' to resume"):
        run_stream(make_trainer(tmp_path), _model(), _digits_stream(), ckpt_path="best")


def _touch(path: Path, mtime: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))
    return path


def test_last_is_the_newest_last_checkpoint_of_the_run(tmp_path):
    """A restarted job logs into a new version folder: `last` looks in every version of the logger's folder, in
    the fixed version only when one is set, and in ModelCheckpoint's dirpath when that is set."""
    older = _touch(tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt", 1_000)
    newer = _touch(tmp_path / "run" / "version_1" / "checkpoints" / "last.ckpt", 2_000)
    _touch(tmp_path / "run" / "version_1" / "checkpoints" / "task00.ckpt", 3_000)
    _touch(tmp_path / "other" / "version_2" / "checkpoints" / "last.ckpt", 4_000)  # another logger name
    assert last_checkpoint(make_trainer(tmp_path, logger=CSVLogger(str(tmp_path), name="run"))) == newer
    assert last_checkpoint(make_trainer(tmp_path, logger=CSVLogger(str(tmp_path), name="run", version=0))) == older
    assert last_checkpoint(make_trainer(tmp_path, logger=CSVLogger(str(tmp_path), name="run", version=7))) is None
    mine = _touch(tmp_path / "fixed" / "last.ckpt", 500)
    fixed = ModelCheckpoint(dirpath=str(tmp_path / "fixed"))
    assert last_checkpoint(make_trainer(tmp_path, callbacks=[fixed])) == mine
    assert last_checkpoint(make_trainer(tmp_path / "empty", logger=False)) is None


def test_last_resumes_a_killed_run_in_its_own_folder(tmp_path):
    """The restarted command is the same: `last` finds the killed run's checkpoint (fixed logger version) and the
    resumed run keeps writing last.ckpt there (no last-v1.ckpt beside it)."""

    def short() -> Finetune:
        return _model(epochs=2)

    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path, crash_at=3, ckpt_path="last", method=short)  # no checkpoint yet: starts at task 0
    model = _run(tmp_path, ckpt_path="last", method=short)  # resumes mid-task 1
    assert model.task_index == 2 and len(_metrics(tmp_path)["tasks"]) == 3
    checkpoints = tmp_path / "run" / "version_0" / "checkpoints"
    assert not list(checkpoints.glob("last-*.ckpt"))
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["callbacks"]["TaskStream"]["completed_task"] == 2


def test_checkpoints_lightning_would_load_into_every_task_are_refused_before_any_fit(tmp_path, monkeypatch):
    """Lightning loads a checkpoint into a fit started without one when an OnExceptionCheckpoint is configured, and
    on SLURM when default_root_dir holds an hpc_ckpt_<n>.ckpt: the stream, one fit per task, refuses both."""
    on_exception = OnExceptionCheckpoint(str(tmp_path / "exception"))
    with pytest.raises(ValueError, match="OnExceptionCheckpoint makes Lightning resume every fit"):
        run_stream(make_trainer(tmp_path, callbacks=[on_exception]), _model(), _digits_stream())
    trainer = make_trainer(tmp_path)
    _touch(tmp_path / "hpc_ckpt_1.ckpt", 1_000)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "stream")
    with pytest.raises(ValueError, match=r"hpc_ckpt_1.ckpt is a checkpoint of Lightning's SLURM auto-requeue"):
        run_stream(trainer, _model(), _digits_stream())
    assert not list(tmp_path.glob("**/last.ckpt"))


def test_finetune_forgets_its_first_task(split_cifar10):
    """Split CIFAR-10 configs shrunk (see conftest): real images, 5 tasks of 2 classes.

    Calibration run (seed 0): Finetune learns task 0 to 75% and ends at 0% on it.
    """
    finetune = split_cifar10("finetune")["scorers"]["cnn"]["accuracy_matrix"]
    # Finetune learned task 0 (well above the 50% chance of a 2-class task) and then lost it entirely.
    assert finetune[0][0] > 65, finetune
    assert finetune[-1][0] < 5, finetune


@pytest.mark.slow  # Joint trains on all data seen so far: the most expensive Split CIFAR-10 run (~3 min)
def test_joint_keeps_the_first_task_that_finetune_forgets(split_cifar10):
    """Calibration run (seed 0): Joint ends at 61% on task 0, Finetune at 0%."""
    finetune = split_cifar10("finetune")["scorers"]["cnn"]["accuracy_matrix"]
    joint = split_cifar10("joint")["scorers"]["cnn"]["accuracy_matrix"]
    assert joint[-1][0] > 40 and joint[-1][0] > finetune[-1][0] + 35, joint


def test_task_incremental_scoring_uses_the_known_task_id(tmp_path):
    """Same training, two scenarios: knowing the task at test time turns 10-way into 2-way decisions."""
    seen = {}
    for scenario in ("class", "task"):
        L.seed_everything(3)
        dm = _digits_stream(initial_classes=2, increment=2, scenario=scenario)
        run_stream(make_trainer(tmp_path / scenario), _model(epochs=2), dm)
        seen[scenario] = _metrics(tmp_path / scenario)["scorers"]["cnn"]["accuracy_matrix"][-1]
    assert seen["class"][0] < 5  # forgotten under class-incremental scoring
    # the same kind of model still separates the old pairs (calibration: 57-85%, mean 71%; chance is 50%)
    assert sum(seen["task"][:4]) / 4 > 60 and min(seen["task"][:4]) > 50


def test_domain_incremental_stream_on_pacs(pacs_root, tmp_path):
    """One task per PACS domain, same 7 classes; the head never grows."""
    L.seed_everything(0)
    dm = TaskStreamDataModule(
        dataset="domains",
        root=str(pacs_root),
        scenario="domain",
        domains=["photo", "cartoon", "sketch"],
        max_train_per_class=15,
        max_test_per_class=10,
        batch_size=32,
        num_workers=0,
    )
    model = Finetune(backbone="resnet20", schedule=TaskSchedule(epochs=1, lr=0.05, milestones=[]))
    run_stream(make_trainer(tmp_path), model, dm)
    metrics = _metrics(tmp_path)
    assert [t["classes_seen"] for t in metrics["tasks"]] == [7, 7, 7] and model.head.out_features == 7
    assert metrics["stream"]["domains"] == ["photo", "cartoon", "sketch"]
    assert all(v is not None for v in metrics["scorers"]["cnn"]["accuracy_matrix"][2])


def test_the_stream_asks_for_exemplars_once_per_task_and_records_the_memory_size(tmp_path):
    """The stream brokers the memory: one question per fit (the data module trains on the answer)."""
    asked = []

    class CountingICaRL(ICaRL):
        def exemplar_indices(self):
            asked.append(self.task_index)
            return super().exemplar_indices()

    schedule = TaskSchedule(epochs=1, lr=0.02, milestones=[])
    model = _run(tmp_path, method=lambda: CountingICaRL("resnet20", 1, schedule, memory_budget=30))
    assert asked == [0, 1, 2]
    assert [t["memory_size"] for t in _metrics(tmp_path)["tasks"]] == [30, 30, 30] == [len(model.memory)] * 3
