"""The task loop: the one place that drives ``trainer.fit`` task after task, checkpoints and resumes.

A stream runs on one Trainer, one ``fit`` per task (the supported shape for multi-stage training in
Lightning 2.x): before each fit the loop raises ``fit_loop.max_epochs`` by the task's epochs, so
counters, loggers and callbacks carry across tasks, and a fresh DDP wrap and optimizer pick up
whatever the method grew or froze in ``on_task_start``. A method whose task has several phases
(``task_phases``, e.g. PackNet's training and retraining) gets one fit per phase, with its
``on_phase_end`` between them.

Resume: every checkpoint records how far the stream got (this callback's state) and what the model
looks like (the module's ``lightning_cil`` entry). Restarting with ``ckpt_path`` replays the fit of
the checkpoint's task through Lightning's own restore (weights, optimizer, loop counters), then goes
on; a checkpoint taken after a task's end skips straight to the next task. ``ckpt_path="last"`` resumes from
the newest ``last.ckpt`` this run wrote, or starts afresh if there is none, so a job that a launcher restarts with
the same command line (torchrun ``--max-restarts``, a requeued SLURM job) goes on where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint, TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from lightning_cil.data.datamodule import TaskStreamDataModule
from lightning_cil.data.scenario import TaskInfo
from lightning_cil.data.task_data import TaskData, TrainingPlan
from lightning_cil.methods.base import CHECKPOINT_KEY, IncrementalModule
from lightning_cil.metrics import METRICS_FILE, AccuracyMatrix
from lightning_cil.seeding import TASK_START, TRAIN_EPOCH, reseed

__all__ = ["LAST", "StreamCallback", "TaskStream", "last_checkpoint", "run_stream"]

#: the ``ckpt_path`` that resumes from the newest ``last.ckpt`` of the run (see :func:`last_checkpoint`)
LAST = "last"


@dataclass(frozen=True)
class _ResumePoint:
    task: int
    task_completed: bool
    callback_states: dict[str, Any]
    phase: int = 0


@rank_zero_only
def _print(text: str) -> None:
    print(text, flush=True)


class StreamCallback(Callback):
    """A Callback that also hears the stream's events, which have no Lightning hook.

    ``TaskStream`` calls these on every rank, on each of the trainer's callbacks that subclasses this class.
    """

    def on_stream_resume(self, trainer: Trainer, pl_module: LightningModule, state: dict[str, Any] | None) -> None:
        """Before the first ``fit`` of a resumed stream, with the state this callback saved in the checkpoint.

        Lightning restores callback states inside ``fit``, after the loggers have started their runs: too late for a
        callback that must tell a logger which run to continue.
        """

    def on_task_evaluated(self, trainer: Trainer, pl_module: LightningModule, stream: TaskStream, task: int) -> None:
        """After task ``task``'s evaluation is recorded in ``stream.matrices`` and ``stream.history``."""


def _stream_callbacks(trainer: Trainer) -> list[StreamCallback]:
    return [callback for callback in trainer.callbacks if isinstance(callback, StreamCallback)]


class TaskStream(Callback):
    """Runs a whole task stream and keeps its results (accuracy matrices per scorer, per-task costs)."""

    def __init__(self) -> None:
        self.completed_task = -1
        self.matrices: dict[str, AccuracyMatrix] = {}
        self.history: list[dict[str, Any]] = []
        self.stream: dict[str, Any] = {}
        self.epoch_budget: list[int] = []
        #: the phase (fit) of the current task that is running or last ran
        self.phase = 0

    # ------------------------------------------------------------------ callback hooks and state

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        reseed(TRAIN_EPOCH, trainer.current_epoch)
        bar = trainer.progress_bar_callback
        if isinstance(bar, TQDMProgressBar) and bar.is_enabled and bar._train_progress_bar is not None:
            task = getattr(pl_module, "task_index", 0)
            bar.train_progress_bar.set_description(
                f"Task {task + 1}/{len(self.epoch_budget)} · Epoch {trainer.current_epoch}"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Tell the data module what this fit trains on, as the method asks (once per fit). Lightning calls this
        after a resumed fit has restored the method's checkpoint (its memory) and before it builds the loaders."""
        datamodule = trainer.datamodule
        if isinstance(datamodule, TaskStreamDataModule) and isinstance(pl_module, IncrementalModule):
            plan = TrainingPlan(
                pl_module.exemplar_indices(), pl_module.held_out_indices(), pl_module.trains_on_all_seen_tasks
            )
            datamodule.train_on(plan)

    def state_dict(self) -> dict[str, Any]:
        return {
            "completed_task": self.completed_task,
            "matrices": {name: m.state_dict() for name, m in self.matrices.items()},
            "history": self.history,
            "stream": self.stream,
            "epoch_budget": self.epoch_budget,
            "phase": self.phase,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.completed_task = int(state_dict["completed_task"])
        self.matrices = {n: AccuracyMatrix.from_state_dict(m) for n, m in state_dict["matrices"].items()}
        self.history = list(state_dict["history"])
        self.stream = dict(state_dict["stream"])
        self.epoch_budget = list(state_dict["epoch_budget"])
        self.phase = int(state_dict.get("phase", 0))

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """A task-end checkpoint gets optimizer states that fit the model as it is now.

        The finished fit's optimizer never steps again (the next task builds its own), but resuming at this
        boundary goes through ``fit``, which loads the saved state into an optimizer built for the current
        parameters; after pruning or growing in ``on_task_end`` the finished fit's state would not fit them.
        """
        at_task_end = self.completed_task >= 0 and self.completed_task == getattr(pl_module, "task_index", None)
        config = pl_module.configure_optimizers() if at_task_end and "optimizer_states" in checkpoint else None
        if isinstance(config, dict) and "optimizer" in config:
            checkpoint["optimizer_states"] = [config["optimizer"].state_dict()]
            scheduler = config.get("lr_scheduler")
            scheduler = scheduler.get("scheduler") if isinstance(scheduler, dict) else scheduler
            checkpoint["lr_schedulers"] = [scheduler.state_dict()] if scheduler is not None else []

    # ------------------------------------------------------------------ the loop

    def run(
        self,
        trainer: Trainer,
        model: IncrementalModule,
        datamodule: TaskStreamDataModule,
        ckpt_path: str | Path | None = None,
    ) -> dict[str, Any]:
        """Train and evaluate every task of ``datamodule`` (from ``ckpt_path``'s point, if given)."""
        if not isinstance(model, IncrementalModule):
            raise TypeError(f"the model must be an IncrementalModule, got {type(model).__name__}.")
        datamodule.prepare_stream()  # every data error surfaces here, before training
        num_tasks = datamodule.num_tasks
        self.epoch_budget = [model.schedule_for_task(t).epochs for t in range(num_tasks)]
        if self not in trainer.callbacks:
            trainer.callbacks.append(self)
        self._keep_last_checkpoint(trainer)
        if ckpt_path is not None and str(ckpt_path) == LAST:
            ckpt_path = last_checkpoint(trainer)
            _print(f"ckpt_path={LAST!r}: " + (f"found {ckpt_path}" if ckpt_path else "no checkpoint of this run yet"))
        stream = datamodule.describe()
        resume = self._resume_point(ckpt_path, stream, model) if ckpt_path else None
        if resume is None:
            self.stream = stream
            self.matrices = {name: AccuracyMatrix(num_tasks) for name in model.scorers}
        else:
            for callback in _stream_callbacks(trainer):
                callback.on_stream_resume(trainer, model, resume.callback_states.get(callback.state_key))
        cumulative = np.cumsum(self.epoch_budget)
        _print(
            f"Stream: {stream['dataset']} ({stream['scenario']}-incremental), {num_tasks} tasks of "
            f"{[len(c) for c in stream['task_classes']]} classes, method {type(model).__name__}"
            + (f"; resuming at task {resume.task}" if resume else "")
        )
        for task in range(resume.task if resume else 0, num_tasks):
            info = datamodule.task_info(task)
            datamodule.set_task(task)
            model.task_data = TaskData(info, datamodule, trainer.strategy)
            restoring = resume is not None and task == resume.task
            if not restoring:
                reseed(TASK_START, task)
                model.on_task_start(info)
            phases = self._phases(model, info)
            ends = int(cumulative[task]) - self.epoch_budget[task] + np.cumsum(phases)
            started = time.perf_counter()
            for phase in range(resume.phase if restoring else 0, len(phases)):
                restoring_phase = restoring and phase == resume.phase
                self.phase = phase
                trainer.fit_loop.max_epochs = int(ends[phase])
                if not restoring_phase:
                    _refuse_implicit_checkpoints(trainer)
                trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt_path) if restoring_phase else None)
                if trainer.state.status == TrainerStatus.INTERRUPTED or trainer.interrupted:
                    _print(f"Stream interrupted in task {task}; resume with --ckpt_path <checkpoints>/last.ckpt")
                    return self.summary()
                if restoring_phase and resume.task_completed:
                    break
                if phase < len(phases) - 1:
                    model.on_phase_end(info, phase)
            if restoring and resume.task_completed:
                continue
            train_seconds = time.perf_counter() - started
            model.on_task_end(info)
            self._evaluate(trainer, model, datamodule, info, train_seconds)
            self.completed_task = task
            self._save_task_checkpoint(trainer, task)
        primary = model.scorers[0]
        _print(self.matrices[primary].format_table(f"Accuracy matrix ({primary}, %):"))
        return self.summary()

    def summary(self) -> dict[str, Any]:
        return {name: m.summary() for name, m in self.matrices.items()}

    # ------------------------------------------------------------------ pieces

    def _phases(self, model: IncrementalModule, info) -> list[int]:
        phases = [int(n) for n in model.task_phases(info)]
        if not phases or min(phases) < 1 or sum(phases) != self.epoch_budget[info.index]:
            raise ValueError(
                f"{type(model).__name__}.task_phases gives {phases} epochs for task {info.index}: each phase needs at "
                f"least one epoch and together they must make the task's {self.epoch_budget[info.index]} epochs."
            )
        return phases

    def _keep_last_checkpoint(self, trainer: Trainer) -> None:
        callback = trainer.checkpoint_callback
        if callback is None:
            rank_zero_warn("checkpointing is disabled: a stopped stream cannot be resumed.")
        elif isinstance(callback, ModelCheckpoint) and not callback.save_last:
            callback.save_last = True  # mid-task resume needs the newest epoch's checkpoint

    def _resume_point(self, ckpt_path: str | Path, stream: dict[str, Any], model: IncrementalModule) -> _ResumePoint:
        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"ckpt_path={str(ckpt_path)!r} does not exist; give a checkpoint file of this stream, or {LAST!r} to "
                f"resume from the newest last.ckpt of this run (or start afresh if there is none)."
            )
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        arch = checkpoint.get(CHECKPOINT_KEY)
        if state is None or arch is None:
            raise ValueError(f"{path} is not a lightning_cil stream checkpoint (no stream state in it).")
        saved = state["stream"]
        for key in ("dataset", "scenario", "class_order", "task_classes"):
            if saved.get(key) != stream.get(key):
                raise ValueError(
                    f"cannot resume from {path}: its stream has {key}={_short(saved.get(key))} but this configuration "
                    f"gives {_short(stream.get(key))}. Resume with the data settings that wrote the checkpoint."
                )
        task = int(arch["task_index"])
        if state["epoch_budget"][: task + 1] != self.epoch_budget[: task + 1]:
            raise ValueError(
                f"cannot resume from {path}: it was trained with epochs per task {state['epoch_budget'][: task + 1]} "
                f"but this configuration gives {self.epoch_budget[: task + 1]} for the same tasks."
            )
        self.load_state_dict(state)
        self.epoch_budget = [*state["epoch_budget"][: task + 1], *self.epoch_budget[task + 1 :]]
        return _ResumePoint(task, int(state["completed_task"]) >= task, checkpoint["callbacks"], self.phase)

    def _evaluate(
        self,
        trainer: Trainer,
        model: IncrementalModule,
        datamodule: TaskStreamDataModule,
        info: TaskInfo,
        seconds: float,
    ) -> None:
        task = info.index
        trainer.test(model, datamodule=datamodule, verbose=False)
        for name, counts in model.last_evaluation.items():
            self.matrices[name].record(task, counts["correct"], counts["correct_top5"], counts["total"])
        primary = model.scorers[0]
        matrix = self.matrices[primary]
        entry = {
            "task": task,
            "classes_seen": info.num_seen_classes,
            "num_parameters": model.num_parameters(),
            "train_seconds": round(seconds, 3),
            "epochs": self.epoch_budget[task],
            **{f"{name}_accuracy_seen": round(100 * float(m.seen[task]), 4) for name, m in self.matrices.items()},
        }
        memory_size = model.memory_size()
        if memory_size is not None:
            entry["memory_size"] = memory_size
        self.history.append(entry)
        stream_metrics = {
            "task": float(task),
            "stream/avg_incremental_accuracy": float(np.nanmean(matrix.seen[: task + 1])),
            "stream/accuracy_seen": float(matrix.seen[task]),
            "stream/num_parameters": float(entry["num_parameters"]),
        }
        for logger in trainer.loggers:
            logger.log_metrics(stream_metrics, step=trainer.global_step)
        self._write_metrics(_run_dir(trainer), model)
        row = " ".join(f"{100 * v:.2f}" for v in matrix.matrix[task, : task + 1])
        _print(
            f"[task {task + 1}/{len(self.epoch_budget)}] {primary} accuracy on seen classes "
            f"{100 * matrix.seen[task]:.2f}% | per task: {row}"
        )
        for callback in _stream_callbacks(trainer):
            callback.on_task_evaluated(trainer, model, self, task)

    @rank_zero_only
    def _write_metrics(self, run_dir: Path, model: IncrementalModule) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        primary = model.scorers[0]
        payload = {
            "method": type(model).__name__,
            "primary_scorer": primary,
            "summary": self.matrices[primary].to_json()["summary"],
            "scorers": {name: m.to_json() for name, m in self.matrices.items()},
            "tasks": self.history,
            "stream": {k: v for k, v in self.stream.items() if k != "class_names"},
            "class_names": self.stream.get("class_names"),
        }
        (run_dir / METRICS_FILE).write_text(json.dumps(payload, indent=2))

    def _save_task_checkpoint(self, trainer: Trainer, task: int) -> None:
        callback = trainer.checkpoint_callback
        if callback is None:
            return
        folder = Path(getattr(callback, "dirpath", None) or _run_dir(trainer) / "checkpoints")
        trainer.save_checkpoint(folder / f"task{task:02d}.ckpt", weights_only=False)
        trainer.save_checkpoint(folder / "last.ckpt", weights_only=False)


def _run_dir(trainer: Trainer) -> Path:
    """The run's folder. ``trainer.log_dir`` broadcasts under DDP: call this on every rank."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def last_checkpoint(trainer: Trainer) -> Path | None:
    """The newest ``last*.ckpt`` this run has written, or None: what ``ckpt_path="last"`` resumes from.

    It looks where this trainer's checkpoints go: the ModelCheckpoint's ``dirpath`` if set; else the logger's
    ``<save_dir>/<name>/<version>/checkpoints``, in *every* version folder when the logger numbers a new version at
    each launch (CSVLogger's and TensorBoardLogger's default, so a restarted job writes into a new folder); without a
    logger, ``<default_root_dir>/checkpoints``. Give the logger a fixed ``version`` to keep runs that share a logger
    name apart. Lightning's own ``ckpt_path="last"`` looks in the new version folder only, and would be applied to
    every task's fit: the stream resolves it once and restores only the fit of the checkpoint's task.
    """
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    if dirpath:
        folders = [Path(dirpath)]
    elif trainer.loggers:
        logger = trainer.loggers[0]
        root = Path(logger.save_dir or trainer.default_root_dir) / str(logger.name or "")
        version = getattr(logger, "_version", None)  # None until the first fit when the logger numbers versions
        if version is None:
            folders = [folder / "checkpoints" for folder in root.iterdir()] if root.is_dir() else []
        else:
            folders = [root / (version if isinstance(version, str) else f"version_{version}") / "checkpoints"]
    else:
        folders = [Path(trainer.default_root_dir) / "checkpoints"]
    found = [path for folder in folders if folder.is_dir() for path in folder.glob("last*.ckpt") if path.is_file()]
    return max(found, key=lambda path: (path.stat().st_mtime_ns, str(path)), default=None)


def _refuse_implicit_checkpoints(trainer: Trainer) -> None:
    """Refuse what makes Lightning load a checkpoint into a fit started without ``ckpt_path``: here every task's fit.

    With an ``OnExceptionCheckpoint`` callback, Lightning resumes such a fit from the newest last checkpoint; on
    SLURM, from the newest ``hpc_ckpt_<n>.ckpt`` of ``default_root_dir`` (its auto-requeue saves them).
    """
    if any(isinstance(callback, OnExceptionCheckpoint) for callback in trainer.callbacks):
        raise ValueError(
            "OnExceptionCheckpoint makes Lightning resume every fit from the newest last checkpoint, which would "
            "restart each task of the stream from the previous one: remove it; the stream checkpoints every epoch "
            f"and task end (last.ckpt), and --ckpt_path {LAST} resumes from the newest."
        )
    if not SLURMEnvironment.detect():
        return
    found = sorted(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"))
    if found:
        raise ValueError(
            f"{found[-1]} is a checkpoint of Lightning's SLURM auto-requeue, which Lightning would load into every "
            f"task's fit of this stream. Move the hpc_ckpt_*.ckpt files out of trainer.default_root_dir, resume with "
            f"--ckpt_path {LAST}, and turn the auto-requeue off (trainer.plugins: SLURMEnvironment with "
            f"auto_requeue: false, as in docker/slurm_der_imagenet100.sbatch)."
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 120 else text[:117] + "..."


def run_stream(
    trainer: Trainer,
    model: IncrementalModule,
    datamodule: TaskStreamDataModule,
    ckpt_path: str | Path | None = None,
) -> dict[str, Any]:
    """Run a whole stream on ``trainer`` (reusing its TaskStream callback if it has one)."""
    stream = next((c for c in trainer.callbacks if isinstance(c, TaskStream)), None) or TaskStream()
    return stream.run(trainer, model, datamodule, ckpt_path)
