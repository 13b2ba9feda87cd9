"""DER's cost per task: training throughput, peak memory and parameter count, with and without pruning.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/der_growth.py --root <cifar100> [--dataset cifar100]
    OMP_WAIT_POLICY=PASSIVE python benchmarks/der_growth.py --root <cifar10> --dataset cifar10 \
        --protocol B0_Inc1 --per-class 100 --backbone resnet20          # CPU-sized

Runs ``configs/der_cifar100_b0_10steps.yaml`` through the CLI, shrunk by command-line overrides (images per
class, epochs, backbone), once with ``prune: false`` and once with ``prune: true``. Per task it records the
training images per second (after the first batches), the peak memory of the training fit (CUDA: peak
allocated; CPU: peak resident set size of the process, which only grows) and the parameter count from the
run's metrics.json. Prints a table and writes benchmarks/results/der_growth.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import lightning as L
import torch
from harness import machine, write_result  # benchmarks/harness.py

from lightning_cil.cli import LightningCILCLI

REPO = Path(__file__).resolve().parents[1]


class CostMeter(L.Callback):
    """Per fit (one task): images/s of the training steps after ``warmup`` batches (loading excluded), images/s
    of the whole fit (loading and Lightning included), and peak memory. Used by ``methods.py`` too."""

    def __init__(self, out: str | None = None, warmup: int = 2) -> None:
        self.out, self.warmup = (Path(out) if out else None), warmup
        self.rows: list[dict] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.images, self.seconds, self.batch_start, self.all_images = 0, 0.0, None, 0
        self.fit_start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.all_images += len(batch[1])
        if batch_idx >= self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - self.batch_start
            self.images += len(batch[1])

    def on_train_end(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        fit_seconds = time.perf_counter() - self.fit_start
        extractors = getattr(pl_module.backbone, "extractors", None)
        self.rows.append(
            {
                "task": pl_module.task_index,
                "extractors": len(extractors) if extractors is not None else 1,
                "images_per_second": self.images / self.seconds if self.seconds else None,
                "fit_seconds": fit_seconds,
                "fit_images_per_second": self.all_images / fit_seconds,
                "peak_memory_mib": peak,
            }
        )
        if self.out is not None:
            self.out.write_text(json.dumps(self.rows))


def run(args, prune: bool, root: Path) -> list[dict]:
    meter_file = root / f"meter_prune_{prune}.json"
    overrides = [
        "fit",
        "--config",
        str(REPO / "configs" / "der_cifar100_b0_10steps.yaml"),
        "--data.dataset", args.dataset,
        "--data.root", args.root,
        "--data.protocol", args.protocol,
        "--data.max_train_per_class", str(args.per_class),
        "--data.max_test_per_class", str(args.per_class),
        "--data.num_workers", str(args.workers),
        "--model.init_args.backbone", args.backbone,
        "--model.init_args.schedule.epochs", str(args.epochs),
        "--model.init_args.schedule.warmup_epochs", "0",
        "--model.init_args.schedule.milestones", "[]",
        "--model.init_args.memory_budget", str(args.memory),
        "--model.init_args.balance_epochs", str(args.balance_epochs),
        "--model.init_args.balance_milestones", "[]",
        "--model.init_args.prune", str(prune).lower(),
        "--model.init_args.sparsity_weight", str(args.sparsity_weight),
        "--trainer.precision", args.precision,
        "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.logger.init_args.name", f"prune_{prune}",
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=der_growth.CostMeter",
        "--trainer.callbacks.out", str(meter_file),
    ]  # fmt: skip
    start = time.perf_counter()
    LightningCILCLI(args=overrides)
    wall = time.perf_counter() - start
    metrics = json.loads(next((root / f"prune_{prune}").glob("version_*/metrics.json")).read_text())
    rows = json.loads(meter_file.read_text())
    for row, task in zip(rows, metrics["tasks"]):
        row.update(num_parameters=task["num_parameters"], accuracy_seen=task.get("accuracy_seen"))
    return [{**row, "wall_seconds": wall, "summary": metrics["summary"]} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--dataset", default="cifar100")
    parser.add_argument("--protocol", default="B0_Inc10")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--backbone", default="resnet18_cifar")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--memory", type=int, default=2000)
    parser.add_argument("--balance-epochs", type=int, default=5)
    parser.add_argument("--sparsity-weight", type=float, default=10.0)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "der_growth.json"))
    parser.add_argument("--work-dir", default="runs/benchmarks/der_growth")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    runs = {}
    for prune in (False, True):
        runs["pruned" if prune else "w/o P"] = run(args, prune, Path(args.work_dir))
    print(f"\nDER per task ({args.dataset} {args.protocol}, {args.backbone}, {args.per_class}/class, {args.precision})")
    print("| variant | task | extractors | parameters | train images/s | peak memory (MiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, rows in runs.items():
        for r in rows:
            ips = f"{r['images_per_second']:.0f}" if r["images_per_second"] else "-"
            print(
                f"| {name} | {r['task']} | {r['extractors']} | {r['num_parameters']:,} | {ips} | "
                f"{r['peak_memory_mib']:.0f} |"
            )
        print(f"| {name} | summary | | | wall {rows[0]['wall_seconds']:.0f} s | {rows[0]['summary']} |")
    result = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("root", "out", "work_dir")},
        "machine": machine(),
        "runs": runs,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
