"""Joint training: the upper bound of every CIL table."""

from __future__ import annotations

from lightning_cil.methods.base import IncrementalModule

__all__ = ["Joint"]


class Joint(IncrementalModule):
    """At each task, train on all data of every task seen so far (no forgetting by construction).

    It is not an incremental method (it stores everything) but the reference the others try to
    approach; iCaRL reports 68.6% for joint training of ResNet-32 on CIFAR-100.
    """

    trains_on_all_seen_tasks = True
