"""Test helper (loaded by `lightning-cil` subprocesses via PYTHONPATH): record what each finished task computes."""

from pathlib import Path

import lightning as L
import torch


class ProbeLogits(L.Callback):
    """After every task's closing evaluation: the logits of 16 test images of each seen task, computed with that
    task's mask, BatchNorm and head active; all of them saved to ``out`` (a dict keyed by (after task, task))."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self.probes: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def on_test_end(self, trainer, pl_module) -> None:
        dataset = trainer.datamodule.test_dataset()
        for j in range(pl_module.task_index + 1):
            if j not in self.probes:
                self.probes[j] = torch.stack(
                    [x for x, _, t in (dataset[i] for i in range(len(dataset))) if t == j][:16]
                )
            pl_module.activate(j)
            self.logits[(pl_module.task_index, j)] = pl_module(self.probes[j].to(pl_module.device)).cpu()
        pl_module.activate(pl_module.task_index)
        torch.save(self.logits, self.out)
