"""Every class-incremental method on the shrunk Split CIFAR-10 stream of the test suite: a results table, and
the reference values of the reproduction guard (tests/test_reproduction.py).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/split_cifar10.py --root <cifar10>
    OMP_WAIT_POLICY=PASSIVE python benchmarks/split_cifar10.py --root <cifar10> --write-reference
    OMP_WAIT_POLICY=PASSIVE python benchmarks/split_cifar10.py --root <cifar10> --seeds 0 1 2 --methods finetune icarl

Each method runs ``configs/<method>_cifar10.yaml`` through the CLI with the suite's overrides
(``SPLIT_CIFAR10_OVERRIDES`` in tests/conftest.py: 200 train / 100 test images per class, ResNet-20,
6 epochs per task, deterministic). Prints a markdown table and writes benchmarks/results/split_cifar10.json;
``--write-reference`` also writes tests/reference/split_cifar10.json (seed 0 only), which the guard compares with.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import REPO, fit_command, machine, write_result  # benchmarks/harness.py

sys.path.insert(0, str(REPO / "tests"))
from conftest import SPLIT_CIFAR10_OVERRIDES  # noqa: E402  (one definition of the shrunk stream)

METHODS = ["finetune", "joint", "lwf", "ewc", "icarl", "wa", "bic", "der"]


def run(method: str, root: str, seed: int, work: Path) -> dict:
    out = work / f"{method}_seed{seed}"
    overrides = list(SPLIT_CIFAR10_OVERRIDES)
    overrides[overrides.index("--seed_everything") + 1] = str(seed)
    command = fit_command(f"{method}_cifar10.yaml")
    command += ["--data.root", root, *overrides]
    command += ["--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out)]
    start = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    )
    if done.returncode:
        raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
    (metrics_file,) = out.glob(f"{method}_cifar10/version_*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    summary = metrics["summary"]
    return {
        "method": method,
        "seed": seed,
        "scorer": metrics["primary_scorer"],
        "avg_incremental_accuracy": summary["avg_incremental_accuracy"],
        "last_accuracy": summary["last_accuracy"],
        "average_forgetting": summary["average_forgetting"],
        "first_task_after_last": metrics["scorers"][metrics["primary_scorer"]]["accuracy_matrix"][-1][0],
        "num_parameters": metrics["tasks"][-1]["num_parameters"],
        "wall_seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--work-dir", default="runs/benchmarks/split_cifar10")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "split_cifar10.json"))
    parser.add_argument("--write-reference", action="store_true")
    args = parser.parse_args()
    rows = [run(m, args.root, s, Path(args.work_dir)) for m in args.methods for s in args.seeds]
    print("| method | scorer | seed | avg incremental acc. | last acc. | task 0 after last | forgetting | wall (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['method']} | {r['scorer']} | {r['seed']} | {r['avg_incremental_accuracy']:.2f} | "
            f"{r['last_accuracy']:.2f} | {r['first_task_after_last']:.2f} | {r['average_forgetting']:.2f} | "
            f"{r['wall_seconds']:.0f} |"
        )
    for method in args.methods:
        values = [r["avg_incremental_accuracy"] for r in rows if r["method"] == method]
        if len(values) > 1:
            print(f"{method}: avg incremental accuracy over seeds {values}: sd {statistics.stdev(values):.2f}")
    write_result(args.out, {"machine": machine(), "rows": rows})
    if args.write_reference:
        reference = {r["method"]: round(r["avg_incremental_accuracy"], 2) for r in rows if r["seed"] == 0}
        path = REPO / "tests" / "reference" / "split_cifar10.json"
        stored = json.loads(path.read_text()) if path.is_file() else {"avg_incremental_accuracy": {}}
        stored["avg_incremental_accuracy"].update(reference)
        path.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
