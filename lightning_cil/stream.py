"""The task loop: the one place that drives ``trainer.fit`` task after task, checkpoints and resumes.

A stream runs on one Trainer, one ``fit`` per task (the supported shape for multi-stage training in
Lightning 2.x): before each fit the loop raises ``fit_loop.max_epochs`` by the task's epochs, so
counters, loggers and callbacks carry across tasks, and a fresh DDP wrap and optimizer pick up
whatever the method grew or froze in ``on_task_start``. A method whose task has several phases
(``task_phases``, e.g. PackNet's training and retraining) gets one fit per phase, with its
``on_phase_end`` between them. A task of 0 epochs (SimpleCIL's, APER's after the first) has no fit: its
work is all in the task hooks.

Resume: every checkpoint records how far the stream got (this callback's state) and what the model
looks like (the module's ``lightning_cil`` entry). Restarting with ``ckpt_path`` replays the fit of
the checkpoint's task through Lightning's own restore (weights, optimizer, loop counters), then goes
on; a checkpoint taken after a task's end skips straight to the next task. ``ckpt_path="last"`` resumes from
the newest ``last.ckpt`` this run wrote, or starts afresh if there is none, so a job that a launcher restarts with
the same command line (torchrun ``--max-restarts``, a requeued SLURM job) goes on where it stopped.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint, TQDMProgressBar
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_cil.checkpoint_io import load_checkpoint, use_atomic_checkpoints
from lightning_cil.data.datamodule import TaskStreamDataModule
from lightning_cil.data.scenario import TaskInfo
from lightning_cil.data.task_data import TaskData, TrainingPlan
from lightning_cil.methods.base import CHECKPOINT_KEY, IncrementalModule, TaskSchedule
from lightning_cil.methods.protocol import check_protocol, protocol_record
from lightning_cil.metrics import METRICS_FILE, AccuracyMatrix
from lightning_cil.seeding import TASK_START, TRAIN_BATCH, TRAIN_EPOCH, reseed

__all__ = [
    "LAST",
    "StreamCallback",
    "StreamDiverged",
    "StreamInterrupted",
    "TaskStream",
    "check_checkpoint",
    "last_checkpoint",
    "run_stream",
]

#: the ``ckpt_path`` that resumes from the newest ``last.ckpt`` of the run (see :func:`last_checkpoint`)
LAST = "last"


#: what a checkpoint's stream must share with the configured one to be resumed or evaluated
STREAM_KEYS = ("dataset", "scenario", "class_order", "task_classes", "train_samples", "test_samples")
#: Lightning warns at every fit of a stream that its checkpoint folder is not empty: it holds the stream's own
#: checkpoints, and a fresh stream refuses a folder that already holds some (see ``_refuse_existing_run``)
_NOT_EMPTY_WARNING = r"Checkpoint directory .* exists and is not empty"


class StreamDiverged(RuntimeError):
    """Training produced a non-finite loss or weights: the stream stops without writing a checkpoint of them."""


class StreamInterrupted(SystemExit):
    """The stream was stopped by a signal; its exit status is the signal's conventional one (128 + number)."""


@dataclass(frozen=True)
class _ResumePoint:
    task: int
    task_completed: bool
    callback_states: dict[str, Any]
    phase: int = 0


@rank_zero_only
def _print(text: str) -> None:
    print(text, flush=True)


@rank_zero_only
def _print_error(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _first_non_finite(state: Mapping[str, Any]) -> str | None:
    """The name of the first floating-point tensor of ``state`` holding a NaN or an infinity, or None."""
    names = [name for name, value in state.items() if torch.is_tensor(value) and value.is_floating_point()]
    if not names:
        return None
    finite = torch.stack([torch.isfinite(state[name]).all() for name in names]).cpu()
    return next((name for name, ok in zip(names, finite.tolist()) if not ok), None)


class _StopSignal:
    """While a stream runs, SIGTERM only records that a stop was asked for; the stream stops at its next safe
    point: after a training step, with a checkpoint there, or after the task checkpoint it is writing.

    Lightning installs its own SIGTERM handler at every fit, validation and test, which stops each rank wherever
    it happens to be and broadcasts from inside the handler; under DDP that can pair mismatched collectives and
    kill a rank (Lightning issue #20806). The stream puts this handler back in those stages' start hooks, and the
    ranks agree on stopping at the same points (:meth:`TaskStream._stop_requested`).
    """

    def __init__(self, stream: TaskStream) -> None:
        self.stream = stream
        self.previous: Any = None

    def __enter__(self) -> _StopSignal:
        self.stream._stop_signal = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._record)
            self.stream._listening = self
        return self

    def listen(self) -> None:
        """Take SIGTERM back from Lightning's handler (called in the hooks that start a fit, validation or test)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._record)

    def _record(self, signum: int, _frame: Any) -> None:
        self.stream._stop_signal = signum

    def __exit__(self, *_: Any) -> None:
        self.stream._listening = None
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


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
        #: one entry per resume of this stream: the checkpoint, where it stood, and the settings changed with it
        self.resumes: list[dict[str, Any]] = []
        self._resume_record: dict[str, Any] | None = None
        self._stop_signal: int | None = None
        self._listening: _StopSignal | None = None

    # ------------------------------------------------------------------ callback hooks and state

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._listen_for_stop()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._listen_for_stop()

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._listen_for_stop()

    def _listen_for_stop(self) -> None:
        if self._listening is not None:  # inside run(): see _StopSignal
            self._listening.listen()

    def _stop_requested(self, trainer: Trainer) -> bool:
        """Whether SIGTERM reached this stream on any rank. Under DDP a collective: every rank calls it at the same
        points (each training step's end, each fit's start, each task checkpoint), so all ranks stop together."""
        requested = self._stop_signal is not None
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        return requested

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """A SIGTERM stops the fit after the optimizer step it arrived in, every rank at the same step, with
        ``last.ckpt`` written there (as a step-interval checkpoint is): the resumed fit continues at the next
        batch instead of training again from the newest epoch-end checkpoint."""
        if (batch_idx + 1) % trainer.accumulate_grad_batches or not self._stop_requested(trainer):
            return
        if trainer.checkpoint_callback is not None:
            path = _checkpoint_folder(trainer) / "last.ckpt"
            try:
                trainer.save_checkpoint(path, weights_only=False)
                _print(f"SIGTERM: saved {path} at global step {trainer.global_step}")
            except StreamDiverged:  # non-finite weights are never saved: the previous last.ckpt stays
                _print_error(f"lightning-cil: the weights at the stop are not finite; {path} was not rewritten")
        raise SIGTERMException

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        reseed(TRAIN_EPOCH, trainer.current_epoch)
        bar = trainer.progress_bar_callback
        if isinstance(bar, TQDMProgressBar) and bar.is_enabled and bar._train_progress_bar is not None:
            task = getattr(pl_module, "task_index", 0)
            bar.train_progress_bar.set_description(
                f"Task {task + 1}/{len(self.epoch_budget)} · Epoch {trainer.current_epoch}"
            )

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # The step's own randomness (dropout, sampled noise) is a function of its position, so a fit resumed from a
        # checkpoint written in the middle of an epoch takes the same steps as an uninterrupted one.
        reseed(TRAIN_BATCH, trainer.current_epoch, batch_idx)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Tell the data module what this fit trains on, as the method asks (once per fit). Lightning calls this
        after a resumed fit has restored the method's checkpoint (its memory) and before it builds the loaders."""
        datamodule = trainer.datamodule
        if isinstance(datamodule, TaskStreamDataModule) and isinstance(pl_module, IncrementalModule):
            plan = TrainingPlan(
                pl_module.exemplar_indices(), pl_module.held_out_indices(), pl_module.trains_on_all_seen_tasks
            )
            datamodule.train_on(plan)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        """Stop at the first non-finite loss, before it reaches the weights (decided together by every rank)."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            raise StreamDiverged(self._divergence(trainer, pl_module, f"the loss is {loss.detach().float().item()}"))

    def _divergence(self, trainer: Trainer, pl_module: LightningModule, what: str) -> str:
        task = getattr(pl_module, "task_index", 0)
        start = int(sum(self.epoch_budget[:task]))
        epochs = self.epoch_budget[task] if task < len(self.epoch_budget) else "?"
        last = last_checkpoint(trainer)
        before = Path(last).parent / f"task{task - 1:02d}.ckpt" if last is not None and task > 0 else None
        where = (
            f"the last good checkpoint is {last} (--ckpt_path last resumes it)"
            + (f"; {before} reruns task {task + 1} with changed settings" if before and before.is_file() else "")
            if last is not None
            else "no checkpoint was written before it"
        )
        return (
            f"training diverged in task {task + 1}/{len(self.epoch_budget)}, epoch {trainer.current_epoch - start + 1}"
            f"/{epochs} of the task (global step {trainer.global_step}): {what}. The stream stopped without saving it; "
            f"{where}. A lower learning rate (model.init_args.schedule.lr) usually helps."
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "completed_task": self.completed_task,
            "matrices": {name: m.state_dict() for name, m in self.matrices.items()},
            "history": self.history,
            "stream": self.stream,
            "epoch_budget": self.epoch_budget,
            "phase": self.phase,
            "resumes": [*self.resumes, *([self._resume_record] if self._resume_record else [])],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.completed_task = int(state_dict["completed_task"])
        self.matrices = {n: AccuracyMatrix.from_state_dict(m) for n, m in state_dict["matrices"].items()}
        self.history = list(state_dict["history"])
        self.stream = dict(state_dict["stream"])
        self.epoch_budget = list(state_dict["epoch_budget"])
        self.phase = int(state_dict.get("phase", 0))
        self.resumes = list(state_dict.get("resumes", []))

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """A task-end checkpoint gets optimizer states that fit the model as it is now.

        A checkpoint of non-finite weights is never written: the stream stops instead (the previous one stays).
        The finished fit's optimizer never steps again (the next task builds its own), but resuming at this
        boundary goes through ``fit``, which loads the saved state into an optimizer built for the current
        parameters; after pruning or growing in ``on_task_end`` the finished fit's state would not fit them.
        """
        bad = _first_non_finite(checkpoint.get("state_dict", {}))
        if bad is not None:  # every rank holds the same weights, so every rank refuses alike
            raise StreamDiverged(self._divergence(trainer, pl_module, f"the weights are not finite ({bad})"))
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
        """Train and evaluate every task of ``datamodule`` (from ``ckpt_path``'s point, if given).

        Stops with :class:`StreamDiverged` at a non-finite loss or weights, and with :class:`StreamInterrupted`
        (status 128 + signal) after SIGTERM, once the checkpoint being written is complete.
        """
        if not isinstance(model, IncrementalModule):
            raise TypeError(f"the model must be an IncrementalModule, got {type(model).__name__}.")
        _refuse_spawned_processes(trainer)
        self._resume_record = None
        datamodule.use_backbone_defaults(model.backbone_data_config())
        datamodule.prepare_stream()  # every data error surfaces here, before training
        check_protocol(model)
        num_tasks = datamodule.num_tasks
        self.epoch_budget = [model.schedule_for_task(t).epochs for t in range(num_tasks)]
        if self not in trainer.callbacks:
            trainer.callbacks.append(self)
        self._keep_last_checkpoint(trainer)
        use_atomic_checkpoints(trainer)
        _refuse_unwritable_folders(trainer)
        if ckpt_path is not None and str(ckpt_path) == LAST:
            ckpt_path = last_checkpoint(trainer)
            _print(f"ckpt_path={LAST!r}: " + (f"found {ckpt_path}" if ckpt_path else "no checkpoint of this run yet"))
        stream = datamodule.describe()
        resume = self._resume_point(ckpt_path, stream, model) if ckpt_path else None
        if resume is None:
            _refuse_existing_run(trainer)
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
        with warnings.catch_warnings(), _StopSignal(self):
            warnings.filterwarnings("ignore", message=_NOT_EMPTY_WARNING)
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
                    if self._stop_requested(trainer):
                        self._stop(trainer, task, signal.SIGTERM)
                    restore = str(ckpt_path) if restoring_phase else None
                    try:
                        if phases == [0]:
                            # A training-free task has no fit: DDP refuses to wrap a model with nothing to train. An
                            # empty validation sets up the strategy instead (launches the processes, joins the
                            # process group) for the task hooks, and restores a resumed task's checkpoint.
                            trainer.validate(model, dataloaders=[], ckpt_path=restore, verbose=False)
                        else:
                            trainer.fit(model, datamodule=datamodule, ckpt_path=restore)
                    except SIGTERMException:
                        self._stop(trainer, task, signal.SIGTERM)
                    if trainer.state.status == TrainerStatus.INTERRUPTED or trainer.interrupted:
                        self._stop(trainer, task, self._stop_signal)
                    if restoring_phase and resume.task_completed:
                        break
                    if phase < len(phases) - 1:
                        model.on_phase_end(info, phase)
                if restoring and resume.task_completed:
                    continue
                train_seconds = time.perf_counter() - started
                model.on_task_end(info)
                bad = _first_non_finite(model.state_dict())
                if bad is not None:
                    raise StreamDiverged(self._divergence(trainer, model, f"the weights are not finite ({bad})"))
                try:
                    self._evaluate(trainer, model, datamodule, info, train_seconds)
                except SIGTERMException:
                    self._stop(trainer, task, signal.SIGTERM)
                self.completed_task = task
                self._save_task_checkpoint(trainer, task)
                if task + 1 < num_tasks and self._stop_requested(trainer):
                    self._stop(trainer, task + 1, signal.SIGTERM)
        primary = model.scorers[0]
        _print(self.matrices[primary].format_table(f"Accuracy matrix ({primary}, %):"))
        return self.summary()

    def _stop(self, trainer: Trainer, task: int, signum: int | None) -> None:
        """Leave an interrupted stream with a non-zero status (a launcher must not count it as done)."""
        last = last_checkpoint(trainer)
        name = signal.Signals(signum).name if signum else "an interruption"
        _print_error(
            f"lightning-cil: stream stopped by {name} in task {task + 1}/{len(self.epoch_budget)}; "
            + (
                f"the newest checkpoint is {last}: resume with --ckpt_path last (same logger version) or "
                f"--ckpt_path {last}"
                if last is not None
                else "no checkpoint was written yet"
            )
        )
        raise StreamInterrupted(128 + signum if signum else 1)

    def summary(self) -> dict[str, Any]:
        return {name: m.summary() for name, m in self.matrices.items()}

    # ------------------------------------------------------------------ pieces

    def _phases(self, model: IncrementalModule, info) -> list[int]:
        phases = [int(n) for n in model.task_phases(info)]
        budget = self.epoch_budget[info.index]
        if budget == 0 and phases == [0]:
            return phases  # a training-free task (see run)
        if not phases or min(phases) < 1 or sum(phases) != budget:
            raise ValueError(
                f"{type(model).__name__}.task_phases gives {phases} epochs for task {info.index}: each phase needs at "
                f"least one epoch and together they must make the task's {budget} epochs."
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
        checkpoint = check_checkpoint(path, model, stream, "resume from")
        state = checkpoint["callbacks"][self.state_key]
        task = int(checkpoint[CHECKPOINT_KEY]["task_index"])
        if state["epoch_budget"][: task + 1] != self.epoch_budget[: task + 1]:
            raise ValueError(
                f"cannot resume from {path}: it was trained with epochs per task {state['epoch_budget'][: task + 1]} "
                f"but this configuration gives {self.epoch_budget[: task + 1]} for the same tasks."
            )
        completed = int(state["completed_task"]) >= task
        changed = _schedule_changes(path, checkpoint.get("hyper_parameters", {}), model, task, completed)
        self.load_state_dict(state)
        self.epoch_budget = [*state["epoch_budget"][: task + 1], *self.epoch_budget[task + 1 :]]
        self._resume_record = {"checkpoint": str(path), "task": task, "task_completed": completed, "changed": changed}
        if changed:
            first, count = task + 2, len(self.epoch_budget)
            later = f"tasks {first}-{count}" if first < count else f"task {count}" if first == count else "no task"
            _print(
                f"Resuming with changed settings, applied to {later} (the trained tasks keep the checkpoint's): "
                + ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changed.items())
            )
        return _ResumePoint(task, completed, checkpoint["callbacks"], self.phase)

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
            "protocol": protocol_record(model),
            "summary": self.matrices[primary].to_json()["summary"],
            "scorers": {name: m.to_json() for name, m in self.matrices.items()},
            "tasks": self.history,
            "stream": {k: v for k, v in self.stream.items() if k != "class_names"},
            "class_names": self.stream.get("class_names"),
            "resumes": self.state_dict()["resumes"],
        }
        temporary = run_dir / f".{METRICS_FILE}.partial"  # written beside, then renamed: a stopped job leaves the old
        temporary.write_text(json.dumps(payload, indent=2))
        os.replace(temporary, run_dir / METRICS_FILE)

    def _save_task_checkpoint(self, trainer: Trainer, task: int) -> None:
        if trainer.checkpoint_callback is None:
            return
        folder = _checkpoint_folder(trainer)
        trainer.save_checkpoint(folder / f"task{task:02d}.ckpt", weights_only=False)
        trainer.save_checkpoint(folder / "last.ckpt", weights_only=False)


def _checkpoint_folder(trainer: Trainer) -> Path:
    """Where the stream writes its own checkpoints (task ends, a SIGTERM's stop): beside ModelCheckpoint's."""
    return Path(getattr(trainer.checkpoint_callback, "dirpath", None) or _run_dir(trainer) / "checkpoints")


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
    folders, _ = _checkpoint_folders(trainer)
    found = [path for folder in folders if folder.is_dir() for path in folder.glob("last*.ckpt") if path.is_file()]
    return max(found, key=lambda path: (path.stat().st_mtime_ns, str(path)), default=None)


def _checkpoint_folders(trainer: Trainer) -> tuple[list[Path], bool]:
    """Where this trainer's checkpoints go (see :func:`last_checkpoint`), and whether that folder is already fixed
    (False: the logger numbers a new version at the first fit, so the candidates are every version's folder)."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    if dirpath:
        return [Path(dirpath)], True
    if not trainer.loggers:
        return [Path(trainer.default_root_dir) / "checkpoints"], True
    logger = trainer.loggers[0]
    root = Path(logger.save_dir or trainer.default_root_dir) / str(logger.name or "")
    version = getattr(logger, "_version", None)  # None until the first fit when the logger numbers versions
    if version is None:
        return ([folder / "checkpoints" for folder in root.iterdir()] if root.is_dir() else []), False
    return [root / (version if isinstance(version, str) else f"version_{version}") / "checkpoints"], True


def check_checkpoint(
    path: str | Path, model: IncrementalModule, stream: dict[str, Any], purpose: str = "use"
) -> dict[str, Any]:
    """The checkpoint at ``path``, once it is known to fit the configured run: the same stream (``stream``, from
    ``datamodule.describe()``), method, backbone and model settings. The configuration is what runs: a checkpoint
    that differs is refused, naming the difference (``purpose`` words the refusal). Schedules are left to the
    caller (evaluation does not use them; a resume may change them for the tasks it has not trained yet)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={str(path)!r} does not exist; give a checkpoint file of this stream, or {LAST!r} to "
            f"resume from the newest last.ckpt of this run (or start afresh if there is none)."
        )
    checkpoint = load_checkpoint(path)
    state = checkpoint.get("callbacks", {}).get(TaskStream.__qualname__)
    if state is None or checkpoint.get(CHECKPOINT_KEY) is None:
        raise ValueError(f"{path} is not a lightning_cil stream checkpoint (no stream state in it).")
    saved = state["stream"]
    for key in STREAM_KEYS:
        if key in saved and saved.get(key) != stream.get(key):
            raise ValueError(
                f"cannot {purpose} {path}: its stream has {key}={_short(saved.get(key))} but this configuration "
                f"gives {_short(stream.get(key))}. Use the data settings that wrote the checkpoint."
            )
    model.check_checkpoint_identity(checkpoint)
    hparams, mine = _plain(checkpoint.get("hyper_parameters", {})), _plain(dict(model.hparams))
    for key in sorted(set(hparams) & set(mine)):
        if key.startswith("_") or key in ("schedule", "first_task") or hparams[key] == mine[key]:
            continue
        raise ValueError(
            f"cannot {purpose} {path}: it was trained with model.init_args.{key}={_short(hparams[key])} but this "
            f"configuration gives {_short(mine[key])}; use the model settings that wrote the checkpoint."
        )
    return checkpoint


def _plain(value: Any) -> Any:
    """Hyperparameters as plain dicts and lists, to compare a checkpoint's with the configured ones."""
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace
        return _plain(value.as_dict())
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _schedule_changes(
    path: Path, hparams: dict[str, Any], model: IncrementalModule, task: int, completed: bool
) -> dict[str, tuple[Any, Any]]:
    """The ``schedule`` settings this configuration changes from the checkpoint's, as ``{"schedule.lr": (old, new)}``:
    they apply to the tasks after the checkpoint's. The task it stopped inside resumes with the checkpoint's optimizer
    and LR scheduler, so its schedule must stay, as must ``first_task`` (task 1 is always trained by then)."""
    hparams, defaults = _plain(hparams), asdict(TaskSchedule())

    def full(value: Any) -> dict[str, Any] | None:
        return None if value is None else {**defaults, **_plain(value)}

    saved_first, my_first = full(hparams.get("first_task")), full(model.first_task_schedule)
    saved, mine = full(hparams.get("schedule")) or defaults, asdict(model.schedule)

    def refuse(index: int, name: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        if old is None or new is None:
            was, now = f"{name}={_short(old)}", f"{name}={_short(new)}"
        else:
            keys = [k for k in defaults if old[k] != new[k]]
            was, now = (", ".join(f"{name}.{k}={d[k]!r}" for k in keys) for d in (old, new))
        redo = (
            f"resume from {path.parent / f'task{index - 1:02d}.ckpt'} to rerun task {index + 1} with it"
            if index > 0
            else f"start a new run to train task {index + 1} with it"
        )
        raise ValueError(
            f"cannot resume from {path}: task {index + 1} was trained with {was} but this configuration gives {now}; "
            f"a changed schedule applies only to tasks not started yet: {redo}."
        )

    if saved_first != my_first:
        refuse(0, "first_task", saved_first, my_first)
    if not completed and not (task == 0 and my_first is not None) and saved != mine:
        refuse(task, "schedule", saved, mine)
    return {f"schedule.{k}": (saved[k], mine[k]) for k in defaults if saved[k] != mine[k]}


def _refuse_spawned_processes(trainer: Trainer) -> None:
    """A strategy that spawns its processes does so at every fit, and Lightning cannot fit twice that way."""
    launcher = trainer.strategy.launcher
    if isinstance(launcher, _MultiProcessingLauncher):
        method = getattr(launcher, "_start_method", "spawn")
        raise ValueError(
            f"trainer.strategy {type(trainer.strategy).__name__} with start_method={method!r} (ddp_spawn, "
            f"ddp_notebook, ddp_fork) starts new processes at every fit, and a stream fits once per task: its "
            f"second task would fail. Use --trainer.strategy ddp, which launches the processes once for the stream."
        )


def _refuse_unwritable_folders(trainer: Trainer) -> None:
    """Say before training, not in the first checkpoint's write, that the run's folders cannot be written."""
    folders = [Path(trainer.default_root_dir)]
    folders += [Path(logger.save_dir) for logger in trainer.loggers if getattr(logger, "save_dir", None)]
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    folders += [Path(dirpath)] if dirpath else []
    for folder in dict.fromkeys(folders):
        existing = folder.absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            if not existing.is_dir():
                raise NotADirectoryError(f"{existing} is a file")
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as error:
            reason = error.strerror or str(error)
            raise ValueError(
                f"the run folder {folder} cannot be written ({existing}: {reason}); give a writable "
                f"trainer.default_root_dir and trainer.logger.init_args.save_dir."
            ) from None


def _refuse_existing_run(trainer: Trainer) -> None:
    """A fresh stream never writes over the checkpoints or metrics of another run in the same folder."""
    folders, fixed = _checkpoint_folders(trainer)
    if not fixed:
        return  # the logger numbers a new version folder for this run
    found = sorted(path.name for folder in folders if folder.is_dir() for path in folder.glob("*.ckpt"))
    run_dir = folders[0].parent if folders[0].name == "checkpoints" else None
    if run_dir is not None and (run_dir / METRICS_FILE).is_file():
        found.append(METRICS_FILE)
    if found:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise ValueError(
            f"{folders[0]} already holds a stream's files ({shown}); a fresh run would overwrite them. Resume that "
            f"run with --ckpt_path {LAST}, or give this one another trainer.logger.init_args.version (or folder)."
        )


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
