"""Test helpers (loaded by DDP workers via PYTHONPATH): one rank dies once, at the start of a given global epoch, or
is sent SIGTERM once, before a given global step."""

import os
import signal
from pathlib import Path

import lightning as L


class CrashOnce(L.Callback):
    """Kill this process at the start of (global) epoch ``epoch`` on global rank ``rank``, unless ``marker`` exists.

    The marker is written first, so the job a launcher restarts with the same command line runs through.
    ``hard``: leave with ``os._exit(1)``, as a killed worker does (no exception handling, no cleanup); otherwise
    raise, as a failing step does.
    """

    def __init__(self, epoch: int, marker: str, rank: int = 0, hard: bool = False) -> None:
        self.epoch, self.marker, self.rank, self.hard = epoch, Path(marker), rank, hard

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != self.epoch or trainer.global_rank != self.rank or self.marker.exists():
            return
        self.marker.write_text(f"rank {self.rank} crashed at the start of epoch {self.epoch}\n")
        if self.hard:
            os._exit(1)
        raise RuntimeError(f"simulated crash at the start of epoch {self.epoch}")


class SigtermOnce(L.Callback):
    """Send this process SIGTERM (a preemption) before the training step of (global) step ``step`` on global rank
    ``rank``, unless ``marker`` exists. Under DDP, Lightning passes it on to the other ranks."""

    def __init__(self, step: int, marker: str, rank: int = 0) -> None:
        self.step, self.marker, self.rank = step, Path(marker), rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step or trainer.global_rank != self.rank or self.marker.exists():
            return
        self.marker.write_text(f"SIGTERM to rank {self.rank} before step {self.step}\n")
        os.kill(os.getpid(), signal.SIGTERM)
