"""Run safety at the command line: the configuration is what runs, and no run is lost, overwritten or counted as done
when it is not (resume checks, divergence, second runs, SIGTERM, spawn strategies, unreadable or unwritable paths,
atomic checkpoint writes). Every run is the quickstart shrunk to 2 tasks of 5 digits."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, cli, digits_stream, make_trainer
from conftest import run_main as run

from lightning_cil import Finetune, TaskSchedule, run_stream
from lightning_cil.checkpoint_io import AtomicCheckpointIO, use_atomic_checkpoints
from lightning_cil.stream import StreamDiverged, StreamInterrupted, TaskStream

QUICKSTART = REPO / "configs" / "quickstart.yaml"
VERSION = "v0"
LWF = ("--model.class_path", "lightning_cil.methods.LwF", "--model.init_args.kd_weight", "3.0")


def schedule(epochs: int = 2, lr: float = 0.02) -> str:
    return f"{{epochs: {epochs}, lr: {lr}, milestones: []}}"


def shrunk(root: Path, *extra: str, epochs: int = 2) -> list[str]:
    """The quickstart as 2 tasks of 5 digits, ``epochs`` per task, logging into ``root``/quickstart/v0."""
    return [
        "--config",
        str(QUICKSTART),
        "--data.protocol",
        "B0_Inc5",
        "--model.init_args.schedule",
        schedule(epochs),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--trainer.logger.init_args.version",
        VERSION,
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


def checkpoints(root: Path) -> Path:
    return root / "quickstart" / VERSION / "checkpoints"


def one_line_error(out: subprocess.CompletedProcess, code: int, pattern: str) -> None:
    assert out.returncode == code, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert re.search(pattern, out.stderr), out.stderr[-3000:]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-task LwF stream with a fixed logger version: checkpoints task00, task01, last, epoch=*."""
    root = tmp_path_factory.mktemp("finished")
    out = cli("fit", *shrunk(root, *LWF))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "exists and is not empty" not in out.stderr  # the stream's own checkpoints are not a stranger's
    return root


# ------------------------------------------------------------------ the configuration is what runs


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            ["--model.class_path", "lightning_cil.methods.ICaRL"],
            r"it holds method='lightning_cil.methods.lwf.LwF' but this run is configured with method=.*ICaRL",
        ),
        ([*LWF, "--model.init_args.backbone", "resnet32"], r"it holds backbone='resnet20' but .*backbone='resnet32'"),
        ([*LWF, "--model.init_args.kd_weight", "1.0"], r"trained with model.init_args.kd_weight=3.0 but this .*1.0"),
        ([*LWF, "--data.protocol", "B0_Inc2"], r"its stream has task_classes=\[\[0, 1, 2, 3, 4\]"),
    ],
    ids=["method", "backbone", "model-setting", "stream"],
)
@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_a_checkpoint_of_another_model_or_stream_is_refused(
    finished_run, tmp_path, monkeypatch, capsys, subcommand, override, message
):
    """LightningCLI used to load the checkpoint's hyper_parameters over the configuration: an ICaRL config resumed
    from another method's checkpoint ran as that method. Resuming and evaluating both refuse it in one line."""
    task_end = checkpoints(finished_run) / "task00.ckpt"
    out = run(monkeypatch, capsys, subcommand, *shrunk(tmp_path, *override, "--ckpt_path", str(task_end)))
    one_line_error(out, 2, message)
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_a_changed_schedule_applies_to_the_tasks_not_trained_yet(finished_run, tmp_path, monkeypatch, capsys):
    """A resume from a task end may change the schedule of the tasks to come: it is what runs, printed and
    recorded in metrics.json. The schedule of the task a checkpoint stopped inside cannot change."""
    task_end = checkpoints(finished_run) / "task00.ckpt"
    lower = ["--model.init_args.schedule", schedule(lr=0.01)]
    out = run(monkeypatch, capsys, "fit", *shrunk(tmp_path, *LWF, *lower, "--ckpt_path", str(task_end)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Resuming with changed settings, applied to task 2 (the trained tasks keep the checkpoint's): " in out.stdout
    assert "schedule.lr 0.02 -> 0.01" in out.stdout
    last = torch.load(checkpoints(tmp_path) / "last.ckpt", weights_only=False)
    assert last["hyper_parameters"]["schedule"]["lr"] == 0.01
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == 0.01  # task 2 trained with the new lr
    metrics = json.loads((checkpoints(tmp_path).parent / "metrics.json").read_text())
    (resume,) = metrics["resumes"]
    assert resume["task"] == 0 and resume["changed"] == {"schedule.lr": [0.02, 0.01]}
    assert len(metrics["tasks"]) == 2


def test_the_schedule_of_a_task_in_progress_cannot_change(finished_run, tmp_path, monkeypatch, capsys):
    """A mid-task checkpoint resumes with its optimizer and LR scheduler: a changed lr for that task is refused,
    naming the task-end checkpoint that reruns it with the new one."""
    (mid_task,) = checkpoints(finished_run).glob("epoch=*.ckpt")  # ModelCheckpoint's newest: before task 2's end
    lower = ["--model.init_args.schedule", schedule(lr=0.01)]
    out = run(monkeypatch, capsys, "fit", *shrunk(tmp_path, *LWF, *lower, "--ckpt_path", str(mid_task)))
    one_line_error(
        out,
        2,
        r"task 2 was trained with schedule.lr=0.02 but this configuration gives schedule.lr=0.01; a changed schedule "
        r"applies only to tasks not started yet: resume from .*task00.ckpt to rerun task 2 with it",
    )


# ------------------------------------------------------------------ no run lost, overwritten, or done when it is not


def test_a_second_fresh_run_never_overwrites_the_first(finished_run, monkeypatch, capsys):
    folder = checkpoints(finished_run)
    before = {path.name: path.read_bytes() for path in [*folder.iterdir(), folder.parent / "metrics.json"]}
    out = run(monkeypatch, capsys, "fit", *shrunk(finished_run, *LWF))
    one_line_error(out, 2, r"already holds a stream's files .*Resume that run with --ckpt_path last, or give this one")
    assert {path.name: path.read_bytes() for path in [*folder.iterdir(), folder.parent / "metrics.json"]} == before


def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """lr 1e6 from task 2 on: the stream stops at the first non-finite loss (exit 1), names where, writes no NaN
    checkpoint, and its last good checkpoint resumes with a corrected lr."""
    first_task = ["--model.init_args.first_task", schedule(epochs=1)]
    diverging = ["--model.init_args.schedule", schedule(lr=1.0e6)]
    out = run(monkeypatch, capsys, "fit", *shrunk(tmp_path, *first_task, *diverging))
    one_line_error(
        out, 1, r"training diverged in task 2/2, epoch 1/2 of the task \(global step \d+\): the loss is (nan|inf)"
    )
    assert re.search(r"the last good checkpoint is .*last.ckpt", out.stderr)
    assert not (checkpoints(tmp_path) / "task01.ckpt").exists()
    for path in checkpoints(tmp_path).glob("*.ckpt"):
        weights = torch.load(path, weights_only=False)["state_dict"].values()
        assert all(torch.isfinite(w).all() for w in weights if w.is_floating_point()), path.name
    last = torch.load(checkpoints(tmp_path) / "last.ckpt", weights_only=False)
    assert last["callbacks"]["TaskStream"]["completed_task"] == 0
    out = run(monkeypatch, capsys, "fit", *shrunk(tmp_path, *first_task, "--ckpt_path", "last"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "average incremental accuracy:" in out.stdout


def test_a_checkpoint_of_non_finite_weights_is_never_written(tmp_path):
    model = torch.nn.Linear(2, 2)
    stream = TaskStream()
    stream.epoch_budget = [1]
    trainer = make_trainer(tmp_path)
    with pytest.raises(StreamDiverged, match=r"the weights are not finite \(weight\)"):
        stream.on_save_checkpoint(trainer, model, {"state_dict": {"weight": torch.tensor([1.0, float("nan")])}})


class _SigtermWhileFitStarts(L.Callback):
    """Sends this process SIGTERM as the second task's fit starts: before Lightning installs its own handler."""

    def on_fit_start(self, trainer, pl_module) -> None:
        if pl_module.task_index == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_sigterm_while_the_last_tasks_fit_starts_stops_the_stream(tmp_path):
    """The signal reaches only the stream's handler there; it used to be noted and then forgotten, and the last
    task trained to its end (status 0, as if the stop had not been asked for)."""
    model = Finetune(backbone="resnet20", in_channels=1, schedule=TaskSchedule(epochs=3, lr=0.02))
    trainer = make_trainer(tmp_path, callbacks=[_SigtermWhileFitStarts()])
    with pytest.raises(StreamInterrupted) as stop:
        run_stream(trainer, model, digits_stream(initial_classes=5, increment=5))
    assert stop.value.code == 128 + signal.SIGTERM
    assert trainer.current_epoch < 6  # the second task stopped in its first epoch


def test_a_stream_stopped_by_sigterm_exits_non_zero_and_resumes(tmp_path):
    """SIGTERM used to end the stream with status 0, as if it were complete (a launcher would not restart it)."""
    long_second_task = ["--model.init_args.first_task", schedule(epochs=1), "--model.init_args.schedule", schedule(10)]
    exe = shutil.which("lightning-cil")
    command = [exe] if exe else [sys.executable, "-m", "lightning_cil"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen(
        [*command, "fit", *shrunk(tmp_path, *long_second_task)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    task_end = checkpoints(tmp_path) / "task00.ckpt"
    deadline = time.monotonic() + 600
    while not task_end.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=600)
    stderr = stderr.decode()
    assert job.returncode == 128 + signal.SIGTERM, (job.returncode, stderr[-3000:])
    assert re.search(r"stream stopped by SIGTERM in task 2/2; the newest checkpoint is .*: resume with", stderr)
    out = cli("fit", *shrunk(tmp_path, *long_second_task, "--ckpt_path", "last"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(json.loads((checkpoints(tmp_path).parent / "metrics.json").read_text())["tasks"]) == 2


# ------------------------------------------------------------------ one line before training


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_notebook"])
def test_spawning_strategies_are_refused_before_training(tmp_path, monkeypatch, capsys, strategy):
    out = run(monkeypatch, capsys, "fit", *shrunk(tmp_path, "--trainer.strategy", strategy))
    one_line_error(
        out, 2, r"starts new processes at every fit, and a stream fits once per task.*--trainer.strategy ddp"
    )
    assert not list(tmp_path.glob("**/*.ckpt"))


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_a_truncated_checkpoint_is_one_line(finished_run, tmp_path, monkeypatch, capsys, subcommand):
    truncated = tmp_path / "cut.ckpt"
    data = (checkpoints(finished_run) / "last.ckpt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    out = run(monkeypatch, capsys, subcommand, *shrunk(tmp_path / "run", *LWF, "--ckpt_path", str(truncated)))
    one_line_error(out, 2, rf"ckpt_path='{re.escape(str(truncated))}' is not a readable checkpoint \(truncated or")


def test_an_unwritable_run_folder_is_named_before_training(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the run folder should be")
    out = run(
        monkeypatch, capsys, "fit", *shrunk(tmp_path, "--trainer.logger.init_args.save_dir", str(blocker / "runs"))
    )
    one_line_error(out, 2, rf"the run folder {re.escape(str(blocker / 'runs'))} cannot be written .*is a file")


# ------------------------------------------------------------------ atomic checkpoint files


def test_a_failed_checkpoint_write_leaves_the_previous_file(tmp_path, monkeypatch):
    """A disk that fills up in the middle of a write must not leave a partial file under the checkpoint's name."""
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)
    previous = target.read_bytes()

    def fill_the_disk(obj, file, *args, **kwargs):
        file.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fill_the_disk)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2}, target)
    assert target.read_bytes() == previous
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no partial file left
    monkeypatch.undo()
    assert torch.load(target, weights_only=False) == {"step": 1}
    trainer = make_trainer(tmp_path)
    use_atomic_checkpoints(trainer)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
