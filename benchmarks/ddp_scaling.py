"""DDP scaling: the same stream on 1 and on N processes; images/s of the fits and wall time of the whole run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/ddp_scaling.py --root <cifar10>                  # CPU, 1 vs 2 processes
    python benchmarks/ddp_scaling.py --root <cifar10> --accelerator gpu --processes 1 2 4 8 \\
        --per-class 5000 --backbone resnet18_cifar --epochs 5 --precision bf16-mixed          # GPUs

Each run is ``lightning-cil fit`` with ``configs/<method>_cifar10.yaml`` and the overrides below, in a fresh
process (DDP over gloo on a CPU, NCCL on GPUs). The global batch is kept: each of N processes gets
``batch_size / N``, so every run takes the same optimisation steps. On a CPU each process gets
``cpu_count / N`` threads (OMP_NUM_THREADS), so the runs share the same cores. Reported per run:

- fit images/s: training samples of all tasks (new data + exemplars, times epochs) / the summed ``trainer.fit``
  wall time of the tasks (from metrics.json's ``train_seconds``);
- wall: the whole command (start-up, dataset decoding on every rank, task ends, evaluation, checkpoints).

Prints a table and writes benchmarks/results/ddp_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from harness import REPO, fit_command, machine, write_result  # benchmarks/harness.py


def run(args: argparse.Namespace, method: str, processes: int, work: Path) -> dict:
    out = work / f"{method}_{processes}"
    command = fit_command(f"{method}_cifar10.yaml")
    command += [
        "--seed_everything", "0",
        "--data.root", args.root,
        "--data.max_train_per_class", str(args.per_class),
        "--data.max_test_per_class", str(args.test_per_class),
        "--data.num_workers", str(args.workers),
        "--data.batch_size", str(args.batch_size // processes),
        "--model.init_args.backbone", args.backbone,
        "--model.init_args.schedule", f"{{epochs: {args.epochs}, lr: 0.05, momentum: 0.9, milestones: []}}",
        "--trainer.accelerator", args.accelerator,
        "--trainer.devices", str(processes),
        "--trainer.strategy", "ddp" if processes > 1 else "auto",
        "--trainer.precision", args.precision,
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{method} on {processes} processes failed:\n{done.stderr[-3000:]}")
    (metrics_file,) = out.glob(f"{method}_cifar10/version_*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    images, previous_memory, seen = 0, 0, 0
    for task in metrics["tasks"]:
        new_classes, seen = task["classes_seen"] - seen, task["classes_seen"]
        images += (new_classes * args.per_class + previous_memory) * task["epochs"]
        previous_memory = task.get("memory_size", 0)
    fit_seconds = sum(task["train_seconds"] for task in metrics["tasks"])
    return {
        "method": method,
        "processes": processes,
        "threads_per_process": int(env["OMP_NUM_THREADS"]),
        "batch_per_process": args.batch_size // processes,
        "train_images": images,
        "fit_seconds": fit_seconds,
        "fit_images_per_second": images / fit_seconds,
        "wall_seconds": wall,
        "train_seconds_per_task": [task["train_seconds"] for task in metrics["tasks"]],
        "avg_incremental_accuracy": metrics["summary"]["avg_incremental_accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="CIFAR-10 folder (train/<class> + test/<class>, or pickles)")
    parser.add_argument("--methods", nargs="+", default=["finetune", "icarl"])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch, split over the processes")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ddp_scaling.json"))
    args = parser.parse_args()

    settings = {k: v for k, v in vars(args).items() if k not in ("root", "out")}
    settings.update(stream="CIFAR-10 B0_Inc2 (5 tasks of 2 classes, natural order)", machine=machine())
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for method in args.methods:
            for processes in args.processes:
                rows.append(run(args, method, processes, Path(work)))
                print(f"{method} x{processes}: wall {rows[-1]['wall_seconds']:.0f} s", flush=True)
    print(f"\nsettings: {json.dumps(settings)}")
    print(
        "| method | processes | threads each | batch each | fit images/s | speed-up | fit s | wall s | avg inc. acc. |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        single = next(r for r in rows if r["method"] == row["method"] and r["processes"] == args.processes[0])
        speedup = row["fit_images_per_second"] / single["fit_images_per_second"]
        print(
            f"| {row['method']} | {row['processes']} | {row['threads_per_process']} | {row['batch_per_process']} | "
            f"{row['fit_images_per_second']:.0f} | {speedup:.2f} | "
            f"{row['fit_seconds']:.1f} | {row['wall_seconds']:.0f} | {row['avg_incremental_accuracy']:.2f} |"
        )
    write_result(args.out, {"settings": settings, "rows": rows})


if __name__ == "__main__":
    main()
