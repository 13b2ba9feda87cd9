"""The ``lightning-cil`` command: LightningCLI whose ``fit`` runs a whole task stream.

lightning-cil fit --config configs/quickstart.yaml
lightning-cil fit --config configs/finetune_cifar10.yaml --model.init_args.schedule.epochs 2
lightning-cil fit --config configs/quickstart.yaml --ckpt_path last   # resume the run's newest last.ckpt, if any
lightning-cil test --config configs/quickstart.yaml --ckpt_path <run>/checkpoints/last.ckpt
lightning-cil report <run> [<run> ...] --out <folder>
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from argparse import ArgumentError
from typing import Any

from lightning import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from lightning_cil import report
from lightning_cil.callbacks import SaveConfigToWandb, WandbDashboard, wandb_loggers
from lightning_cil.data import TaskStreamDataModule
from lightning_cil.data.datasets import DatasetError
from lightning_cil.methods import IncrementalModule
from lightning_cil.quiet import silence_meaningless_notices
from lightning_cil.stream import run_stream

__all__ = ["LightningCILCLI", "main"]

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


def _is_configuration_error(error: BaseException) -> bool:
    """A ValueError/FileNotFoundError raised by lightning_cil's own checks (not from deep inside a library), or
    an unreadable dataset file (re-raised by torch's DataLoader when a loader worker read it)."""
    if isinstance(error, DatasetError):
        return True
    if not isinstance(error, (ValueError, FileNotFoundError)):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"{os.sep}lightning_cil{os.sep}" in frames[-1].filename


def _raised_in_jsonargparse(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return isinstance(error, ArgumentError) or (bool(frames) and f"{os.sep}jsonargparse{os.sep}" in frames[-1].filename)


def _configuration_error(error: BaseException) -> BaseException | None:
    """The lightning_cil check behind ``error``: the error itself, or the one that jsonargparse wrapped while
    instantiating a typed argument (its "Does not validate against any of the Union subtypes" message)."""
    while error is not None:
        if _is_configuration_error(error):
            return error
        if not _raised_in_jsonargparse(error):
            return None
        error = error.__cause__
    return None


def _method_names() -> list[str]:
    from lightning_cil import methods

    return [
        name
        for name in methods.__all__
        if isinstance(getattr(methods, name), type)
        and issubclass(getattr(methods, name), IncrementalModule)
        and getattr(methods, name) is not IncrementalModule
    ]


def _unknown_method(error: ArgumentError) -> str | None:
    """The one-line message for a ``model.class_path`` that names no method (None for other parse errors)."""
    if not str(error).startswith('Parser key "model"'):
        return None
    union: BaseException | None = error
    while union is not None and not str(union).startswith("Does not validate against any of the Union subtypes"):
        union = union.__cause__
    # the Union error's cause is the error of its first subtype, IncrementalModule: the model's own class_path
    cause = union.__cause__ if union is not None else None
    text = str(cause)
    if given := re.match(r"Problem with given class_path '([^']*)':", text):
        if not isinstance(cause.__cause__, (ImportError, AttributeError)):
            return None
        reason = f"it cannot be imported ({cause.__cause__})"
    elif given := re.match(r"(?:Expected a dot import path string|Unexpected import path format): (.*)", text):
        reason = "it is not a method name or import path"
    elif given := re.match(r"Import path (\S+) does not correspond to a subclass", text):
        reason = "it is not an IncrementalModule subclass"
    else:
        return None
    names = _method_names()
    return (
        f"model.class_path={given.group(1)!r} is not a method: {reason}. Available methods: {', '.join(names)} "
        f"(e.g. lightning_cil.methods.{names[0]}), or the import path of your own IncrementalModule subclass."
    )


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


#: jsonargparse raises parse errors instead of printing the whole usage, so that main() can word them
_RAISE_PARSE_ERRORS = {
    "exit_on_error": False,
    **{cmd: {"exit_on_error": False} for cmd in ("fit", "validate", "test", "predict")},
}


def main(args: Any = None) -> None:
    """Console entry point. Configuration errors print one line, not a traceback
    (set LIGHTNING_CIL_TRACEBACK=1 to see it). ``report`` is answered here, without building a LightningCLI."""
    argv = sys.argv[1:] if args is None else args
    silence_meaningless_notices()
    try:
        if isinstance(argv, (list, tuple)) and argv[:1] == ["report"]:
            report.main(argv[1:])
        else:
            LightningCILCLI(args=args, parser_kwargs=_RAISE_PARSE_ERRORS)
    except ArgumentError as error:
        if os.environ.get("LIGHTNING_CIL_TRACEBACK"):
            raise
        found = _configuration_error(error)
        message = _unknown_method(error) or (_one_line(found) if found is not None else str(error))
        print(f"lightning-cil: error: {message}", file=sys.stderr)
        if found is None and not message.startswith("model.class_path="):
            subcommands = (["fit"], ["validate"], ["test"], ["predict"])
            command = f"{argv[0]} " if isinstance(argv, (list, tuple)) and argv[:1] in subcommands else ""
            print(f"For the accepted options run: lightning-cil {command}--help", file=sys.stderr)
        sys.exit(2)
    except Exception as error:
        found = _configuration_error(error)
        if found is None or os.environ.get("LIGHTNING_CIL_TRACEBACK"):
            raise
        print(f"lightning-cil: error: {_one_line(found)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
