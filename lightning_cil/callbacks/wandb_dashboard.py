"""A stream's W&B dashboard: per-task charts on a ``task`` axis, the accuracy matrix, one run across resumes.

Lightning's WandbLogger plots everything against the global step, which means little in a stream whose tasks
have different lengths; here the stream's numbers get the task index as their x-axis. Everything is done
through the trainer's WandbLoggers (any number, next to other loggers) and only on rank 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import yaml
from lightning import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from lightning_cil.stream import StreamCallback, TaskStream

__all__ = ["SaveConfigToWandb", "WandbDashboard", "wandb_loggers"]

#: per-task numbers that TaskStream logs itself (fractions); the dashboard puts them on the task axis too
STREAM_KEYS = ("stream/accuracy_seen", "stream/avg_incremental_accuracy", "stream/num_parameters")


def wandb_loggers(trainer: Trainer) -> list[WandbLogger]:
    """The trainer's WandbLoggers, in the order of ``trainer.loggers``."""
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def _percent(values: Any) -> list[float | None]:
    return [None if np.isnan(v) else round(100 * float(v), 2) for v in values]


class WandbDashboard(StreamCallback):
    """Logs a stream's results to every WandbLogger of the trainer; does nothing without one.

    After each task it logs, with ``task`` as the x-axis: every scorer's running summary
    (``stream/<scorer>/avg_incremental_accuracy``, ``.../average_forgetting``, ...), the classes seen, the
    training time and the exemplar-memory size; the primary scorer's accuracy matrix as a table
    (``stream/accuracy_matrix``, %) and as a heatmap image; and a line chart of the accuracy on seen classes
    and the average incremental accuracy against the number of classes. The parameter count is the
    stream's own ``stream/num_parameters``.

    The W&B run id is saved in every checkpoint, and resuming a stream from one continues that run.
    """

    def __init__(self) -> None:
        self.run_ids: list[str | None] = []
        self._defined: set[tuple[str, str]] = set()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.run_ids and trainer.loggers and isinstance(trainer.loggers[0], WandbLogger):
            rank_zero_warn(
                "the first logger is a WandbLogger, so metrics.json and config.yaml go straight into its save_dir "
                f"({trainer.loggers[0].save_dir}), shared by every run: put a CSVLogger (or TensorBoardLogger) first."
            )
        # Lightning has started the loggers' runs by now (on rank 0; other ranks keep None)
        self.run_ids = [logger.version for logger in wandb_loggers(trainer)]

    def state_dict(self) -> dict[str, Any]:
        return {"run_ids": self.run_ids}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.run_ids = list(state_dict.get("run_ids", []))

    def on_stream_resume(self, trainer: Trainer, pl_module: LightningModule, state: dict[str, Any] | None) -> None:
        """Point each WandbLogger at the run its checkpoint came from, before the logger starts a run."""
        saved = (state or {}).get("run_ids", [])
        for logger, run_id in zip(wandb_loggers(trainer), saved):
            # WandbLogger takes a run id only at construction; a configured `id` wins over the checkpoint's.
            if run_id is None or logger._wandb_init.get("id"):
                continue
            if logger._experiment is not None:
                rank_zero_warn(f"the W&B run {logger.version} had already started; it cannot continue run {run_id}.")
                continue
            logger._id = logger._wandb_init["id"] = run_id
            logger._wandb_init["resume"] = logger._wandb_init.get("resume") or "allow"

    @rank_zero_only
    def on_task_evaluated(self, trainer: Trainer, pl_module: LightningModule, stream: TaskStream, task: int) -> None:
        loggers = wandb_loggers(trainer)
        if not loggers:
            return
        scalars = self._scalars(stream, task)
        media = self._media(stream, task, pl_module.scorers[0])
        for logger in loggers:
            run = logger.experiment
            self._define_task_axis(run, [*STREAM_KEYS, *scalars])
            run.log({"task": task, **scalars, **media})

    # ------------------------------------------------------------------ pieces

    def _define_task_axis(self, run: Any, keys: list[str]) -> None:
        """Plot ``keys`` against ``task``. Exact names: WandbLogger's own ``*`` pattern would win over a pattern."""
        for key in ["task", *keys]:
            if (run.id, key) not in self._defined:
                if key == "task":
                    run.define_metric("task")
                else:
                    run.define_metric(key, step_metric="task")
                self._defined.add((run.id, key))

    @staticmethod
    def _scalars(stream: TaskStream, task: int) -> dict[str, float]:
        entry = stream.history[-1]
        scalars: dict[str, float] = {
            "stream/classes_seen": entry["classes_seen"],
            "stream/train_seconds": entry["train_seconds"],
        }
        if "memory_size" in entry:
            scalars["stream/memory_size"] = entry["memory_size"]
        for name, matrix in stream.matrices.items():
            for key, value in matrix.summary().items():
                if value is not None:
                    scalars[f"stream/{name}/{key}"] = value
        return scalars

    @staticmethod
    def _media(stream: TaskStream, task: int, primary: str) -> dict[str, Any]:
        import wandb

        from lightning_cil.plots import accuracy_matrix_figure, to_image

        matrix = stream.matrices[primary]
        columns = ["after task", *[f"T{j}" for j in range(matrix.num_tasks)], "seen"]
        rows = [[i, *_percent(matrix.matrix[i]), *_percent(matrix.seen[i : i + 1])] for i in range(task + 1)]
        title = f"accuracy matrix (%), {primary} scorer, after task {task}"
        heatmap = accuracy_matrix_figure(matrix, title, tasks=matrix.num_tasks)
        classes = [entry["classes_seen"] for entry in stream.history]
        seen = _percent(matrix.seen[: task + 1])
        running = _percent([np.mean(matrix.seen[: i + 1]) for i in range(task + 1)])
        curve = wandb.plot.line_series(
            xs=classes,
            ys=[seen, running],
            keys=["accuracy on seen classes", "average incremental accuracy"],
            title=f"Accuracy (%, {primary}) vs number of classes",
            xname="classes",
        )
        return {
            "stream/accuracy_matrix": wandb.Table(columns=columns, data=rows),
            "stream/accuracy_matrix_heatmap": wandb.Image(to_image(heatmap), caption=f"after task {task}"),
            "stream/accuracy_curve": curve,
        }


class SaveConfigToWandb(SaveConfigCallback):
    """LightningCLI's config saver that also puts the whole resolved config into each W&B run's config."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        loggers = wandb_loggers(trainer)
        if loggers:
            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            for logger in loggers:
                logger.experiment.config.update(config, allow_val_change=True)
