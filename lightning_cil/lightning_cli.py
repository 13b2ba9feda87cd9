"""``LightningCILCLI``: LightningCLI whose ``fit`` runs a whole task stream (the ``fit``/``test`` side of the
``lightning-cil`` command; ``lightning_cil.cli`` is its entry point)."""

from __future__ import annotations

import os
from typing import Any

from lightning import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from lightning_cil.callbacks import SaveConfigToWandb, WandbDashboard, wandb_loggers
from lightning_cil.data import TaskStreamDataModule
from lightning_cil.methods import IncrementalModule
from lightning_cil.stream import LAST, check_checkpoint, run_stream

__all__ = ["DEFAULT_SEED", "LightningCILCLI"]

#: seed of every run that does not set one: CIL results are compared across methods on the same seed
DEFAULT_SEED = 1993


class LightningCILCLI(LightningCLI):
    """LightningCLI for task streams. Only ``fit`` differs from Lightning's: it loops over the tasks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", DEFAULT_SEED)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", SaveConfigToWandb)
        # CSV is the embedded default logger (no extra dependency, readable by `report` and pandas);
        # TensorBoard and W&B are one `trainer.logger` entry away.
        kwargs.setdefault(
            "trainer_defaults",
            {"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}},
        )
        super().__init__(IncrementalModule, TaskStreamDataModule, *args, **kwargs)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's trainer, plus the stream's W&B dashboard whenever a WandbLogger is configured."""
        trainer = super().instantiate_trainer(**kwargs)
        if wandb_loggers(trainer) and not any(isinstance(c, WandbDashboard) for c in trainer.callbacks):
            trainer.callbacks.append(WandbDashboard())
        return trainer

    def _parse_ckpt_path(self) -> None:
        """Keep the configuration the user gave. LightningCLI would parse the checkpoint's ``hyper_parameters`` over
        it (this method is its only hook for that), so that a resume ran the checkpoint's method, backbone and learning
        rate instead of the configured ones. The stream compares the checkpoint with the configuration instead, and
        refuses one that differs (``check_checkpoint``); ``test``/``validate`` do the same in :meth:`before_test`."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_channels", "model.init_args.in_channels", apply_on="instantiate")

    def before_fit(self) -> None:
        max_epochs = self.config[self.subcommand].trainer.get("max_epochs")
        if max_epochs is not None:
            raise ValueError(
                f"trainer.max_epochs={max_epochs} has no effect on a task stream: epochs are set per task by "
                f"model.init_args.schedule.epochs and model.init_args.first_task.epochs."
            )

    def fit(self, model: IncrementalModule, datamodule: TaskStreamDataModule, ckpt_path: str | None = None, **_: Any):
        """Train every task of the stream (``trainer.fit`` once per task), evaluating after each.

        ``ckpt_path`` resumes from a checkpoint of the stream; ``"last"`` from the newest ``last.ckpt`` of this run,
        or from the start if there is none (for jobs that a launcher restarts with the same command line).
        """
        return run_stream(self.trainer, model, datamodule, ckpt_path)

    def before_validate(self) -> None:
        self._prepare_evaluation()

    def before_test(self) -> None:
        self._prepare_evaluation()

    def _prepare_evaluation(self) -> None:
        # the data gets the backbone's own input transforms, as the stream gave them in training
        self.datamodule.use_backbone_defaults(self.model.backbone_data_config())
        self._check_evaluated_checkpoint()

    def _check_evaluated_checkpoint(self) -> None:
        """``test``/``validate`` evaluate the checkpoint as the configuration describes it: the same stream, method,
        backbone and model settings (the checkpoint's schedules do not matter here), else a one-line refusal."""
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path is None or (str(ckpt_path) in ("best", LAST, "hpc", "registry") and not os.path.isfile(ckpt_path)):
            return
        check_checkpoint(ckpt_path, self.model, self.datamodule.describe(), "evaluate")

    def after_validate(self) -> None:
        self._print_evaluation()

    def after_test(self) -> None:
        self._print_evaluation()

    @rank_zero_only
    def _print_evaluation(self) -> None:
        model = self.model
        for name, counts in model.last_evaluation.items():
            seen = model.task_index + 1
            correct, total = counts["correct"][:seen], counts["total"][:seen]
            per_task = " ".join(f"{100 * c / max(t, 1):.2f}" for c, t in zip(correct, total))
            print(
                f"Evaluation after task {model.task_index + 1}/{model.num_tasks} ({name}): accuracy on seen classes "
                f"{100 * sum(correct) / max(sum(total), 1):.2f}% | per task: {per_task}",
                flush=True,
            )
