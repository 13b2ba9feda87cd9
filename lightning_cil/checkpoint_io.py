"""Checkpoint files: written so that a partial file never carries a checkpoint's name, read with one-line errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer import Trainer

__all__ = ["AtomicCheckpointIO", "load_checkpoint", "use_atomic_checkpoints"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on local filesystems: the checkpoint goes to a temporary file in
    the target's folder (``.<name>.partial``), is flushed to disk, and only then replaces the target (``os.replace``).

    A job killed, or a disk that fills up, in the middle of a write leaves the previous file of that name intact
    (Lightning's own writer stages the file in the system's temporary folder and copies it over when that lies on
    another filesystem, which is not atomic). Remote paths (``s3://`` ...) keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.partial")  # one writer per file: global rank 0
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def use_atomic_checkpoints(trainer: Trainer) -> None:
    """Give the trainer's strategy the atomic writer, unless it was configured with a checkpoint writer of its own."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` (on the CPU); a missing, truncated or corrupt file is a one-line ValueError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # torch reports a truncated zip as RuntimeError, a damaged pickle as several others
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"ckpt_path={str(path)!r} is not a readable checkpoint (truncated or corrupt: {reason}); give another "
            f"checkpoint of this run, e.g. an earlier task<NN>.ckpt from the same folder."
        ) from None
