"""Finetune: the lower bound of every CIL table."""

from __future__ import annotations

from lightning_cil.methods.base import IncrementalModule

__all__ = ["Finetune"]


class Finetune(IncrementalModule):
    """Train on each new task's data alone, with cross-entropy over all classes seen so far.

    Nothing protects old classes, so their accuracy collapses ("catastrophic forgetting"); PyCIL's
    CIFAR-100 B0 10-step reading is 9.1% last accuracy. Every other method is measured against it.
    """
