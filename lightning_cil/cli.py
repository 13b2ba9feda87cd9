"""The ``lightning-cil`` command: LightningCLI whose ``fit`` runs a whole task stream.

    lightning-cil fit --config configs/quickstart.yaml
    lightning-cil fit --config configs/finetune_cifar10.yaml --model.init_args.schedule.epochs 2
    lightning-cil test --config configs/quickstart.yaml --ckpt_path <run>/checkpoints/last.ckpt
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_cil.data import TaskStreamDataModule
from lightning_cil.methods import IncrementalModule
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
        super().__init__(IncrementalModule, TaskStreamDataModule, *args, **kwargs)

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
        """Train every task of the stream (``trainer.fit`` once per task), evaluating after each."""
        return run_stream(self.trainer, model, datamodule, ckpt_path)


def main(args: Any = None) -> None:
    LightningCILCLI(args=args)


if __name__ == "__main__":
    main()
