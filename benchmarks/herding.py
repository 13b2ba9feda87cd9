"""Exemplar selection time (herding, vectorised in torch) for the sizes iCaRL meets.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/herding.py [--device cuda]

Prints a table and writes benchmarks/results/herding.json. Cases: 5,000 candidates x 512-d features
to 500 exemplars (ResNet-18 features, one ImageNet-sized class), and one CIFAR-100 task with ResNet-32
features: 10 new classes x 500 images x 64-d, 2,000 exemplars over 20 seen classes -> 100 per class.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from harness import machine, write_result  # benchmarks/harness.py

from lightning_cil.data.memory import ExemplarMemory, herding


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "herding.json"))
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    big = torch.randn(5000, 512, generator=g).to(args.device)
    task = {
        label: (torch.arange(label * 500, (label + 1) * 500), torch.randn(500, 64, generator=g).to(args.device))
        for label in range(10, 20)
    }

    def cifar100_task() -> None:
        memory = ExemplarMemory(budget=2000)
        memory.update(range(20), task)

    rows = [
        {"case": "5000 x 512-d -> 500 exemplars", "seconds": _time(lambda: herding(big, 500), args.repeats)},
        {"case": "CIFAR-100 task: 10 classes x 500 x 64-d -> 100 each", "seconds": _time(cifar100_task, args.repeats)},
    ]
    setting = {"selection_device": args.device, "machine": machine()}
    print(f"setting: {json.dumps(setting)}")
    print(f"{'case':<56}{'seconds':>10}")
    for row in rows:
        print(f"{row['case']:<56}{row['seconds']:>10.3f}")
    write_result(args.out, {"setting": setting, "results": rows})


if __name__ == "__main__":
    main()
