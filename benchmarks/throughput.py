"""Data-loader and training throughput of the core stream on CIFAR-shaped data.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/throughput.py --root <cifar10>   # ImageFolder tree or pickles

Prints a table and writes benchmarks/results/throughput.json. The loader number is what the
TaskStreamDataModule serves (uint8 tensor in memory + the CIFAR augmentation preset, collated
batches); the training numbers are ``trainer.fit`` of the second task on those batches (first batches
excluded) for Finetune and for iCaRL, whose step also runs the frozen previous model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import lightning as L
import torch

from lightning_cil import Finetune, ICaRL, TaskSchedule, TaskStreamDataModule


class _Throughput(L.Callback):
    """Images per second over the training batches after ``warmup``."""

    def __init__(self, warmup: int = 3) -> None:
        self.warmup, self.images, self.start = warmup, 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.images += len(batch[1])

    def images_per_second(self) -> float:
        return self.images / (time.perf_counter() - self.start)


def _datamodule(args, num_workers: int) -> TaskStreamDataModule:
    dm = TaskStreamDataModule(
        dataset="cifar10",
        root=args.root,
        protocol="B0_Inc2",
        class_order_seed=None,
        batch_size=args.batch_size,
        num_workers=num_workers,
        max_train_per_class=args.per_class,
    )
    dm.set_task(0)
    return dm


def loader_throughput(args, num_workers: int) -> float:
    dm = _datamodule(args, num_workers)
    loader = dm._loader(dm.train_dataset(), args.batch_size, torch.utils.data.RandomSampler(dm.train_dataset()))
    images, start = 0, None
    for epoch in range(2):
        for i, (x, _, _) in enumerate(loader):
            if epoch == 0 and i == 2:
                start, images = time.perf_counter(), 0
            images += len(x)
    return images / (time.perf_counter() - start)


def training_throughput(args, backbone: str, method: type = Finetune) -> float:
    """Images/s of the training step in the second task (iCaRL then also runs its frozen teacher)."""
    dm = _datamodule(args, args.train_workers)
    model = method(backbone=backbone, schedule=TaskSchedule(epochs=1, lr=0.1))
    model.on_task_start(dm.task_info(0))
    model.on_task_start(dm.task_info(1))
    dm.set_task(1)
    meter = _Throughput()
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_epochs=1,
        limit_train_batches=args.batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[meter],
        precision=args.precision,
    )
    trainer.fit(model, datamodule=dm)
    return meter.images_per_second()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="CIFAR-10 folder (train/<class>, test/<class>, or pickles)")
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20, help="training batches per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--train-workers", type=int, default=0)
    parser.add_argument("--backbones", nargs="+", default=["resnet32", "resnet18_cifar"])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "throughput.json"))
    args = parser.parse_args()

    setting = {
        "torch_threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "cpu_count": os.cpu_count(),
        "batch_size": args.batch_size,
        "data": f"CIFAR-10, {args.per_class} images per class, in-memory uint8",
        "accelerator": args.accelerator,
        "precision": args.precision,
        "torch": torch.__version__,
        "lightning": L.__version__,
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    rows = []
    for workers in args.workers:
        rows.append(
            {"what": "data loader (CIFAR aug)", "workers": workers, "images_per_s": loader_throughput(args, workers)}
        )
    for backbone in args.backbones:
        for method in (Finetune, ICaRL):
            rows.append(
                {
                    "what": f"{method.__name__} training step, {backbone}",
                    "workers": args.train_workers,
                    "images_per_s": training_throughput(args, backbone, method),
                }
            )
    print(f"setting: {json.dumps(setting)}")
    print(f"{'measurement':<44}{'workers':>8}{'images/s':>12}")
    for row in rows:
        print(f"{row['what']:<44}{row['workers']:>8}{row['images_per_s']:>12.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"setting": setting, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
