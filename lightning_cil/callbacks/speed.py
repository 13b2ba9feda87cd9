"""Opt-in speed options for a stream: channels-last memory format and ``torch.compile`` of the feature extractors.

Both act at the start of every ``fit`` (and ``test``), before Lightning wraps the module for DDP, because
methods grow between tasks: DER adds an extractor, heads widen, pruning replaces layers. Whatever a task
start added is converted or compiled before its first step.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning import Callback, LightningModule, Trainer
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["ChannelsLast", "CompileBackbone", "COMPILE_MODES"]

#: the ``mode`` values of ``torch.compile`` (None: its default)
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class ChannelsLast(Callback):
    """Keep the module's 4-D weights in ``torch.channels_last`` (NHWC) memory format.

    Convolutions pick the channels-last kernels when their weight is channels-last, so the first convolution
    converts each batch on the device and every activation after it stays channels-last; batches are not
    converted separately. Tensor cores prefer this layout under ``16-mixed`` / ``bf16-mixed``; on a CPU it
    can be slower (see ``benchmarks/README.md``). Checkpoints are unaffected (values, not layouts, are stored).
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pl_module.to(memory_format=torch.channels_last)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # a resumed module rebuilds what it grew after ``setup``: convert the rebuilt layers too
        pl_module.to(memory_format=torch.channels_last)


class CompileBackbone(Callback):
    """``torch.compile`` the method's feature extractors (the backbone; for DER, each per-task extractor).

    Compilation is in place (``nn.Module.compile``): parameter names and checkpoints do not change. It is
    redone at every fit, so an extractor added or replaced at a task start is compiled before it trains;
    TorchDynamo also recompiles by itself when a guarded shape or mode changes (train/eval, the last
    smaller batch). Heads stay eager: they widen every task and cost little. The first steps of a fit pay
    for compilation (minutes on a CPU, tens of seconds on a GPU), so it pays off only for long tasks.

    Not supported, and refused at the start of the fit: backbones with weight parametrizations (Piggyback,
    PackNet: their masks change the computed graph at every task switch) or forward hooks (DER with
    ``prune: true``: the annealed mask scale changes every batch). Each would recompile until TorchDynamo
    gives up and runs eagerly.

    Args:
        mode: ``torch.compile`` mode: None (its default), ``default``, ``reduce-overhead`` (CUDA graphs),
            ``max-autotune`` or ``max-autotune-no-cudagraphs``.
        dynamic: ``torch.compile``'s ``dynamic`` (None: dynamic shapes after the first shape change).
    """

    def __init__(
        self,
        mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None,
        dynamic: bool | None = None,
    ) -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"CompileBackbone mode={mode!r} is unknown; choose one of {list(COMPILE_MODES)}.")
        self.mode, self.dynamic = mode, dynamic

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._compile(pl_module)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._compile(pl_module)

    def _compile(self, pl_module: LightningModule) -> None:
        for name, extractor in compile_targets(pl_module):
            _check_compilable(name, extractor, type(pl_module).__name__)
            extractor.compile(mode=self.mode, dynamic=self.dynamic)


def compile_targets(pl_module: LightningModule) -> list[tuple[str, nn.Module]]:
    """The feature extractors to compile: ``backbone``, or each of ``backbone.extractors`` (DER)."""
    backbone = getattr(pl_module, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"CompileBackbone needs a module with a `backbone`; {type(pl_module).__name__} has none.")
    extractors = getattr(backbone, "extractors", None)
    if isinstance(extractors, nn.ModuleList):
        return [(f"backbone.extractors.{i}", e) for i, e in enumerate(extractors)]
    return [("backbone", backbone)]


def _check_compilable(name: str, extractor: nn.Module, method: str) -> None:
    for path, module in extractor.named_modules():
        where = f"{name}.{path}" if path else name
        if parametrize.is_parametrized(module):
            raise ValueError(
                f"CompileBackbone does not support {method}: {where} has weight parametrizations (per-task masks), "
                f"which change the compiled graph at every task switch. Remove the callback for this method."
            )
        if module._forward_hooks or module._forward_pre_hooks:
            raise ValueError(
                f"CompileBackbone does not support {method} here: {where} has forward hooks (e.g. DER's channel "
                f"masks with prune: true, whose scale changes every batch). Remove the callback or set prune: false."
            )
