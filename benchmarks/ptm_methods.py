"""Speed and memory of the pre-trained-model methods: images/s of training and of inference, and peak memory.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/ptm_methods.py --root <cifar10 train/test tree>    # the small ViT, CPU
    python benchmarks/ptm_methods.py --root <cifar10> --backbone timm:vit_base_patch16_224.augreg_in21k \\
        --weights none --accelerator gpu --precision bf16-mixed --per-class 200 --batch 64 --workers 8  # a GPU

Every method runs the offline stream of the tests (CIFAR-10's dog, frog, horse, ship and truck as 3 + 2
classes; ``--per-class`` training images each) in a process of its own, so that a CPU's peak resident memory is
its own. It records, with ``der_growth.CostMeter``, the training steps' images/s (after 2 warm-up batches; loading
excluded) of every fit that trains (APER's and RanPAC's first task, every task of EASE, SLCA and the prompt
methods), the wall time of the stream, and the peak memory. After the stream it times, on one fixed batch in eval
mode (under the run's precision), the forward the method needs per test image (SimpleCIL, RanPAC and SLCA one ViT
pass, APER and the prompt methods two, EASE one per task) and, for the prototype methods, the feature extraction of
a task end. The weights do not change the speed: ``--weights none`` measures a randomly initialised backbone (the
hub is not needed).

Prints a table and writes benchmarks/results/ptm_methods.json (settings, machine record).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, machine, write_result  # benchmarks/harness.py

HERE = Path(__file__).resolve().parent
METHODS = ("SimpleCIL", "APER", "RanPAC", "EASE", "SLCA", "L2P", "DualPrompt", "CODAPrompt")
DEFAULT_WEIGHTS = REPO / "weights" / "vit_micro_patch8_32.cifar10_5cls.safetensors"
UNSEEN = ("dog", "frog", "horse", "ship", "truck")


def _unseen_tree(root: Path, into: Path) -> Path:
    for split in ("train", "test"):
        (into / split).mkdir(parents=True)
        for name in UNSEEN:
            (into / split / name).symlink_to(root / split / name, target_is_directory=True)
    return into


def _model(method: str, args: argparse.Namespace):
    from lightning_cil import TaskSchedule
    from lightning_cil import methods as lcm

    weights = None if args.weights == "none" else args.weights
    common = {"backbone": args.backbone, "pretrained": weights}
    adapt = TaskSchedule(epochs=args.epochs, lr=0.01, momentum=0.9, weight_decay=5e-4, scheduler="cosine")
    prompt = TaskSchedule(epochs=args.epochs, lr=1e-3, optimizer="adam", weight_decay=0.0, milestones=[])
    if method == "SimpleCIL":
        return lcm.SimpleCIL(**common)
    if method == "APER":
        return lcm.APER(first_task=adapt, **common)
    if method == "RanPAC":
        return lcm.RanPAC(first_task=adapt, projection_dim=args.projection_dim, **common)
    if method == "EASE":
        return lcm.EASE(schedule=adapt, **common)
    if method == "SLCA":
        slow = TaskSchedule(epochs=args.epochs, lr=0.01, momentum=0.9, weight_decay=5e-4, milestones=[])
        return lcm.SLCA(schedule=slow, **common)
    return getattr(lcm, method)(schedule=prompt, **common)


def _child(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    from der_growth import CostMeter

    from lightning_cil import TaskStreamDataModule, run_stream
    from lightning_cil.methods.prototypes import PrototypeModule
    from lightning_cil.precision import full_precision

    torch.set_num_threads(args.threads)
    L.seed_everything(0)
    model = _model(args.method, args)
    preset = {"augmentation": "cifar10"} if getattr(model.backbone, "data_config", None) is None else {}
    data = TaskStreamDataModule(
        dataset="imagefolder", root=args.tree, initial_classes=3, increment=2, class_order_seed=None,
        max_train_per_class=args.per_class, max_test_per_class=args.per_class // 2, batch_size=args.batch,
        num_workers=args.workers, **preset,
    )  # fmt: skip
    meter = CostMeter()
    with tempfile.TemporaryDirectory() as folder:
        trainer = L.Trainer(
            accelerator=args.accelerator, devices=1, precision=args.precision, default_root_dir=folder,
            logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[meter],
        )  # fmt: skip
        started = time.perf_counter()
        summary = run_stream(trainer, model, data)
        stream_seconds = time.perf_counter() - started
    device = trainer.strategy.root_device
    model.to(device).eval()
    images = next(iter(data.test_dataloader()))[0][: args.batch].to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision.startswith("bf16"))

    def rate(fn, context) -> float:
        with torch.no_grad(), context:
            fn(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.repeats):
                fn(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return args.repeats * len(images) / (time.perf_counter() - start)

    row = {
        "method": args.method,
        "train_images_per_second": [r["images_per_second"] for r in meter.rows if r["images_per_second"]],
        "stream_seconds": round(stream_seconds, 1),
        "inference_images_per_second": round(rate(model, autocast), 1),
        "peak_memory_mib": round(max([r["peak_memory_mib"] for r in meter.rows] or [0.0]), 1),
        "last_accuracy": summary[model.scorers[0]]["last_accuracy"],
    }
    if isinstance(model, PrototypeModule):  # task ends extract in full precision (statistics in fp32)
        row["feature_images_per_second"] = round(rate(model.features, full_precision(device.type)), 1)
    if device.type == "cuda":
        row["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        import resource

        row["peak_memory_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="CIFAR-10 as train/<class>, test/<class> folders")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--backbone", default="vit_micro_patch8_32")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="a weights file, or none")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--projection-dim", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--out", default=str(HERE / "results" / "ptm_methods.json"))
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        return _child(args)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        tree = _unseen_tree(Path(args.root).resolve(), Path(folder) / "unseen")
        for method in args.methods:
            command = [sys.executable, __file__, *sys.argv[1:], "--method", method, "--tree", str(tree)]
            out = subprocess.run(command, capture_output=True, text=True, cwd=HERE)
            if out.returncode != 0:
                sys.exit(f"{method} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'method':<11} {'train img/s':>12} {'inference img/s':>16} {'features img/s':>15} {'peak MiB':>9} {'s':>6}")
    for row in rows:
        train = "/".join(f"{v:.0f}" for v in row["train_images_per_second"]) or "-"
        features = row.get("feature_images_per_second", "-")
        print(
            f"{row['method']:<11} {train:>12} {row['inference_images_per_second']:>16} {features:>15} "
            f"{row['peak_memory_mib']:>9} {row['stream_seconds']:>6}"
        )
    settings = {k: v for k, v in vars(args).items() if k not in ("method", "tree", "root", "out")}
    if Path(args.weights).is_absolute() and Path(args.weights).is_relative_to(REPO):
        settings["weights"] = str(Path(args.weights).relative_to(REPO))  # the record names repository files only
    write_result(args.out, {"settings": settings, "machine": machine(), "methods": rows})


if __name__ == "__main__":
    main()
