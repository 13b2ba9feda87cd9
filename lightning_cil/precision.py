"""Mixed precision: which Trainer precisions a stream supports, and full precision for the work that needs it.

Under ``16-mixed`` / ``bf16-mixed`` Lightning runs the training and evaluation steps under autocast and
keeps every weight in fp32. The work of a task end (exemplar features, herding, class means, EWC's
Fisher, DER's and BiC's classifier stages) runs outside ``trainer.fit``, and :func:`full_precision`
keeps it in fp32 even if it is called while autocast is on: on CPU, for instance, autocast turns the
matrix-vector product of herding into a bf16 product, which changes the exemplars it picks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["SUPPORTED_PRECISIONS", "check_precision", "full_precision"]

#: Trainer precisions a stream runs under (``16-mixed`` needs CUDA; Lightning turns it into bf16 on a CPU)
SUPPORTED_PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")


def check_precision(precision: str) -> None:
    """Refuse precisions that would hold weights, exemplar features or the Fisher in half precision."""
    if str(precision) not in SUPPORTED_PRECISIONS:
        raise ValueError(
            f"trainer.precision={precision!r} is not supported by lightning_cil; choose one of "
            f"{list(SUPPORTED_PRECISIONS)} (mixed precision keeps the weights, exemplar features and EWC's Fisher "
            f"in fp32, which '-true' half precisions would not)."
        )


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Turn autocast off for ``device_type`` (``"cpu"``, ``"cuda"``, ...) inside the block; a no-op elsewhere."""
    try:
        context = torch.autocast(device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know has no autocast to turn off
        context = contextlib.nullcontext()
    with context:
        yield
