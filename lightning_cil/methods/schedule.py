"""The optimisation of one task: optimizer, learning-rate schedule and epochs, as plain values that a checkpoint
records and a resume compares.

The optimizer is one of the short names or the import path of any ``torch.optim.Optimizer``; the scheduler is a
step decay, a cosine decay, or the import path of any ``torch.optim.lr_scheduler.LRScheduler``. Extra keyword
arguments go in ``optimizer_args`` / ``scheduler_args``. A linear warm-up can precede any of them.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["OPTIMIZERS", "SCHEDULERS", "TaskSchedule"]

#: short optimizer names
OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
#: built-in LR schedules (any LRScheduler import path works too)
SCHEDULERS = ("step", "cosine")


def _import(path: str, base: type, what: str, names: list[str]) -> type:
    module, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError) as error:
        found, reason = None, f"it cannot be imported ({error})"
    else:
        reason = "it is not an import path"
    if found is None:
        raise ValueError(
            f"{what}={path!r}: {reason}; choose one of {names} or the import path of a {base.__module__}."
            f"{base.__name__} subclass."
        )
    if not (isinstance(found, type) and issubclass(found, base)):
        raise ValueError(f"{what}={path!r} is not a {base.__module__}.{base.__name__} subclass.")
    return found


def _check_arguments(cls: type, given: dict[str, Any], what: str) -> None:
    parameters = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(given) - set(parameters))
    if unknown:
        accepted = [n for n in parameters if n not in ("params", "optimizer")]
        raise ValueError(f"{what} {unknown} are not arguments of {cls.__name__}; it accepts {accepted}.")


@dataclass
class TaskSchedule:
    """Optimisation of one task: every CIL paper gives the first task its own epochs and learning rates.

    Args:
        epochs: training epochs of the task; 0 trains nothing (a training-free task, e.g. SimpleCIL's, or the later
            tasks of APER, whose work is all in the task hooks).
        lr: initial learning rate (of every parameter group that does not scale it, see
            ``IncrementalModule.parameter_groups``).
        optimizer: ``sgd``, ``adam``, ``adamw``, or the import path of any ``torch.optim.Optimizer`` (e.g.
            ``torch.optim.RAdam``); it gets ``lr`` and, where it takes them, ``momentum`` and ``weight_decay``.
        momentum: SGD momentum.
        weight_decay: L2 penalty (decoupled for AdamW).
        optimizer_args: further keyword arguments of the optimizer (e.g. ``{betas: [0.9, 0.999], nesterov: true}``).
        scheduler: ``step`` (multiply by ``gamma`` after each of ``milestones``), ``cosine`` (from ``lr`` down to
            ``min_lr`` over the epochs after the warm-up), or the import path of any LR scheduler, built as
            ``scheduler(optimizer, **scheduler_args)`` and stepped once per epoch.
        milestones: epochs (counted within the task) after which ``step`` multiplies the LR by ``gamma``.
        gamma: LR decay factor of ``step``.
        min_lr: final LR of ``cosine``.
        scheduler_args: keyword arguments of an imported scheduler.
        warmup_epochs: linear LR warm-up epochs at the start of the task (from lr / (warmup_epochs + 1)).
    """

    epochs: int = 70
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer_args: dict[str, Any] | None = None
    scheduler: str = "step"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    min_lr: float = 0.0
    scheduler_args: dict[str, Any] | None = None
    warmup_epochs: int = 0

    def check(self, name: str) -> None:
        """Refuse settings that cannot run, naming the bad value (before any training)."""
        if self.epochs < 0:
            raise ValueError(f"{name}.epochs={self.epochs} must be at least 0 (0: the task trains nothing).")
        if self.epochs == 0:
            return  # nothing is optimised: the optimizer settings are never used
        if self.lr <= 0:
            raise ValueError(f"{name}.lr={self.lr} must be positive.")
        bad = [m for m in self.milestones if not 0 < m < self.epochs]
        if bad:
            raise ValueError(f"{name}.milestones {bad} must lie within 1..{self.epochs - 1} (epochs={self.epochs}).")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"{name}.warmup_epochs={self.warmup_epochs} must be in 0..{self.epochs - 1}.")
        if not 0 <= self.min_lr < self.lr:
            raise ValueError(f"{name}.min_lr={self.min_lr} must be in [0, lr={self.lr}).")
        _check_arguments(self.optimizer_class(name), self._optimizer_kwargs(), f"{name}.optimizer_args")
        scheduler = self.scheduler_class(name)
        if scheduler is not None:
            _check_arguments(scheduler, dict(self.scheduler_args or {}), f"{name}.scheduler_args")
        elif self.scheduler_args:
            raise ValueError(f"{name}.scheduler_args are for an imported scheduler; scheduler={self.scheduler!r}.")

    def optimizer_class(self, name: str = "schedule") -> type[Optimizer]:
        if self.optimizer in OPTIMIZERS:
            return OPTIMIZERS[self.optimizer]
        return _import(self.optimizer, Optimizer, f"{name}.optimizer", sorted(OPTIMIZERS))

    def scheduler_class(self, name: str = "schedule") -> type[LRScheduler] | None:
        """The imported scheduler class; None for the built-in ``step`` and ``cosine``."""
        if self.scheduler in SCHEDULERS:
            return None
        return _import(self.scheduler, LRScheduler, f"{name}.scheduler", list(SCHEDULERS))

    def _optimizer_kwargs(self) -> dict[str, Any]:
        cls = self.optimizer_class()
        accepted = inspect.signature(cls).parameters
        kwargs = {k: v for k, v in (("momentum", self.momentum), ("weight_decay", self.weight_decay)) if k in accepted}
        if cls is not torch.optim.SGD:
            kwargs.pop("momentum", None)  # Adam-style optimizers take betas, not momentum
        return {**kwargs, **(self.optimizer_args or {})}

    def build(self, params: list[dict[str, Any]]) -> tuple[Optimizer, LRScheduler]:
        """The optimizer over ``params`` (groups may scale the LR by ``lr_scale``) and its per-epoch scheduler."""
        groups = []
        for group in params:
            group = dict(group)
            if "lr_scale" in group:
                group["lr"] = self.lr * group["lr_scale"]
            groups.append(group)
        optimizer = self.optimizer_class()(groups, lr=self.lr, **self._optimizer_kwargs())
        decay_epochs = self.epochs - self.warmup_epochs
        imported = self.scheduler_class()
        if imported is not None:
            decay: LRScheduler = imported(optimizer, **(self.scheduler_args or {}))
        elif self.scheduler == "cosine":
            decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, decay_epochs, self.min_lr)
        else:
            decay = torch.optim.lr_scheduler.MultiStepLR(optimizer, self.milestones, self.gamma)
        if not self.warmup_epochs:
            return optimizer, decay
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0 / (self.warmup_epochs + 1), 1.0, self.warmup_epochs)
        return optimizer, torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, decay], [self.warmup_epochs])


# Hyperparameters saved in checkpoints hold TaskSchedule objects: allow them under weights_only loading.
torch.serialization.add_safe_globals([TaskSchedule])
