"""Test helper (loaded by DDP subprocesses via PYTHONPATH): dump each rank's method state after every task."""

import hashlib
import json
from pathlib import Path

import lightning as L
import torch


def _digest(digest, value) -> None:
    """Feed a nested structure of tensors, containers and plain values into ``digest`` (order-stable)."""
    if isinstance(value, torch.Tensor):
        digest.update(str(value.dtype).encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _digest(digest, value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            _digest(digest, item)
    else:
        digest.update(repr(value).encode())


class RankStateDump(L.Callback):
    """After the evaluation that closes each task, write what this rank holds: memory, class means, weights."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_test_end(self, trainer, pl_module) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        # what the method keeps outside its state dict (EWC's penalties, BiC's bias layers, WA's alignment, ...)
        architecture = hashlib.sha256()
        _digest(architecture, pl_module.architecture())
        memory = getattr(pl_module, "memory", None)
        state = {
            "task": pl_module.task_index,
            "memory": memory.state_dict()["exemplars"] if memory is not None else None,
            "class_means": getattr(pl_module, "class_means", torch.zeros(0)).cpu().tolist(),
            "weights_sha256": digest.hexdigest(),
            "architecture_sha256": architecture.hexdigest(),
            "pruning": getattr(pl_module, "pruning_history", None),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}_task{pl_module.task_index}.json"
        path.write_text(json.dumps(state))
