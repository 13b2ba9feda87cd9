"""Test helper (loaded by DDP subprocesses via PYTHONPATH): dump each rank's method state after every task."""

import hashlib
import json
from pathlib import Path

import lightning as L
import torch


class RankStateDump(L.Callback):
    """After the evaluation that closes each task, write what this rank holds: memory, class means, weights."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_test_end(self, trainer, pl_module) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        memory = getattr(pl_module, "memory", None)
        state = {
            "task": pl_module.task_index,
            "memory": memory.state_dict()["exemplars"] if memory is not None else None,
            "class_means": getattr(pl_module, "class_means", torch.zeros(0)).cpu().tolist(),
            "weights_sha256": digest.hexdigest(),
            "pruning": getattr(pl_module, "pruning_history", None),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}_task{pl_module.task_index}.json"
        path.write_text(json.dumps(state))
