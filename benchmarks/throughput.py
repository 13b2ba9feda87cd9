"""Data-loader and training throughput of the core stream on CIFAR-shaped data, or on ImageNet-shaped random data.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/throughput.py --root <cifar10>   # ImageFolder tree or pickles
    python benchmarks/throughput.py --synthetic 4096 --accelerator gpu --precision bf16-mixed --channels-last \
        --batch-size 256 --batches 50 --out benchmarks/results/throughput_imagenet_gpu.json   # any device

Prints a table and writes benchmarks/results/throughput.json (or ``--out``). The loader number is what the
TaskStreamDataModule serves (uint8 tensor in memory + the CIFAR augmentation preset, collated
batches); the training numbers are ``trainer.fit`` of the second task on those batches (first batches
excluded) for Finetune and for iCaRL, whose step also runs the frozen previous model.

``--synthetic N`` replaces CIFAR by N random ``uint8`` images of ``--image-size`` (224) in memory, ResNet-18
(ImageNet stem) and 1,000 classes: the shape of an ImageNet run, without its files or JPEG decoding. Batches are
normalised on the training device (as with ``data.gpu_augmentation``); there is no crop-resize, so this measures
the model, precision and memory-format side, not an ImageNet input pipeline. ``--channels-last`` and
``--compile`` add the ``ChannelsLast`` and ``CompileBackbone`` callbacks; ``--gpu-augmentation`` augments the
CIFAR batches on the training device (``data.gpu_augmentation``).

``--ceiling`` adds, beside each training number, the compute ceiling: the same model and trainer fed one fixed
batch that already sits on the device (no loader, no host-to-device copy; the device-side augmentation still
runs), so the gap between the two is what the input pipeline costs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
from harness import machine, speed_callbacks, write_result  # benchmarks/harness.py
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from lightning_cil import DER, Finetune, ICaRL, TaskInfo, TaskSchedule, TaskStreamDataModule
from lightning_cil.data.batch_augmentation import build_batch_augmentation

#: training batches left out of the timing (first-batch allocations, autotuning, compilation)
WARMUP_BATCHES = 3
#: command-line name -> method trained in the measurement
METHODS = {"finetune": Finetune, "icarl": ICaRL, "der": DER}


class _Throughput(L.Callback):
    """Images per second over the training batches after ``warmup`` (GPU work waited for)."""

    def __init__(self, warmup: int = WARMUP_BATCHES) -> None:
        self.warmup, self.images, self.start, self.end = warmup, 0, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            _synchronize()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            _synchronize()
            self.images += len(batch[1])
            self.end = time.perf_counter()

    def images_per_second(self) -> float:
        return self.images / (self.end - self.start)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _datamodule(args, num_workers: int, batch_size: int) -> TaskStreamDataModule:
    dm = TaskStreamDataModule(
        dataset="cifar10",
        root=args.root,
        protocol="B0_Inc2",
        class_order_seed=None,
        batch_size=batch_size,
        num_workers=num_workers,
        max_train_per_class=args.per_class,
        gpu_augmentation=args.gpu_augmentation,
    )
    dm.set_task(0)
    return dm


class _SyntheticImages(L.LightningDataModule):
    """``n`` random uint8 images in memory with labels of the second task; normalised on the device."""

    def __init__(self, n: int, size: int, classes: int, batch_size: int, num_workers: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
        self.labels = torch.randint(0, classes, (n,), generator=generator)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.normalize = build_batch_augmentation("none").normalize  # ImageNet statistics

    def train_dataloader(self) -> DataLoader:
        # whole batches by one gather (a batch sampler indexing the tensors), not image by image plus a collate
        dataset = TensorDataset(self.images, self.labels, torch.ones_like(self.labels))
        batches = BatchSampler(RandomSampler(dataset), self.batch_size, drop_last=True)
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        workers = self.num_workers
        return DataLoader(
            dataset, sampler=batches, batch_size=None, num_workers=workers, pin_memory=on_gpu,
            persistent_workers=workers > 0,
        )  # fmt: skip

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels, tasks = batch
        return self.normalize(images), labels, tasks


class _FixedBatch(L.LightningDataModule):
    """The compute ceiling's data: the first training batch of ``source``, moved to the device once and served
    ``batches`` times; ``source``'s device-side step (augmentation, normalisation) still runs on every batch."""

    def __init__(self, source: L.LightningDataModule, batches: int) -> None:
        super().__init__()
        self.source, self.batches = source, batches

    def train_dataloader(self) -> _Repeat:
        self.source.trainer = self.trainer  # the source's loader reads the model being trained (exemplars)
        device = self.trainer.strategy.root_device
        batch = [tensor.to(device) for tensor in next(iter(self.source.train_dataloader()))]
        return _Repeat(batch, self.batches)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return self.source.on_after_batch_transfer(batch, dataloader_idx)


class _Repeat:
    """An iterable of one batch ``n`` times (a list would be taken for a list of loaders)."""

    def __init__(self, batch, n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self):
        return (self.batch for _ in range(self.n))

    def __len__(self) -> int:
        return self.n


def _two_tasks(classes: int) -> list[TaskInfo]:
    """A first task with half the classes and a second with the rest (the second is measured)."""
    half = classes // 2
    return [
        TaskInfo(0, 2, tuple(range(half)), half, classes, label_task=(0,) * half),
        TaskInfo(1, 2, tuple(range(half, classes)), classes, classes, label_task=(0,) * half + (1,) * (classes - half)),
    ]


def loader_throughput(args, num_workers: int, batch_size: int) -> float:
    dm = _datamodule(args, num_workers, batch_size)
    loader = dm._loader(dm.train_dataset(), batch_size, torch.utils.data.RandomSampler(dm.train_dataset()))
    images, start = 0, None
    for epoch in range(2):
        for i, (x, _, _) in enumerate(loader):
            if epoch == 0 and i == 2:
                start, images = time.perf_counter(), 0
            images += len(x)
    return images / (time.perf_counter() - start)


def training_throughput(args, backbone: str, method: type, batch_size: int) -> tuple[float, float | None]:
    """Images/s of the training step in the second task (iCaRL also runs its frozen teacher, DER trains its
    second extractor beside the frozen first), and with ``--ceiling`` the same on a fixed batch (else None)."""
    if args.synthetic:
        dm = _SyntheticImages(args.synthetic, args.image_size, args.classes, batch_size, args.train_workers)
        tasks = _two_tasks(args.classes)
    else:
        dm = _datamodule(args, args.train_workers, batch_size)
        tasks = [dm.task_info(0), dm.task_info(1)]
        dm.set_task(1)
    model = method(backbone=backbone, schedule=TaskSchedule(epochs=1, lr=0.1))
    for task in tasks:
        model.on_task_start(task)
    measured = [_fit_throughput(args, model, dm)]
    if args.ceiling:
        measured.append(_fit_throughput(args, model, _FixedBatch(dm, args.batches)))
    return measured[0], measured[1] if args.ceiling else None


def _fit_throughput(args, model: L.LightningModule, dm: L.LightningDataModule) -> float:
    meter = _Throughput()
    callbacks = [meter, *speed_callbacks(args.channels_last, args.compile)]
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_epochs=1,
        limit_train_batches=args.batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        precision=args.precision,
    )
    trainer.fit(model, datamodule=dm)
    return meter.images_per_second()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="CIFAR-10 folder (train/<class>, test/<class>, or pickles)")
    parser.add_argument("--synthetic", type=int, help="N random ImageNet-shaped uint8 images instead of CIFAR")
    parser.add_argument("--image-size", type=int, default=224, help="with --synthetic")
    parser.add_argument("--classes", type=int, default=1000, help="with --synthetic")
    parser.add_argument("--channels-last", action="store_true", help="the ChannelsLast callback")
    parser.add_argument("--compile", action="store_true", help="the CompileBackbone callback")
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--gpu-augmentation", action="store_true", help="CIFAR: data.gpu_augmentation")
    parser.add_argument("--ceiling", action="store_true", help="also time each model on a fixed batch (no loader)")
    parser.add_argument("--methods", nargs="+", default=["finetune", "icarl"], choices=list(METHODS))
    parser.add_argument("--batch-size", type=int, nargs="+", default=[128], help="one measurement per size")
    parser.add_argument("--batches", type=int, default=20, help="training batches per measurement")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2], help="loader measurements (none: skip)")
    parser.add_argument("--train-workers", type=int, default=0)
    parser.add_argument("--backbones", nargs="+", help="default: resnet32 resnet18_cifar (CIFAR), resnet18 (synthetic)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "throughput.json"))
    args = parser.parse_args()
    if (args.root is None) == (args.synthetic is None):
        parser.error("give either --root (CIFAR-10) or --synthetic N (random ImageNet-shaped images)")
    if args.batches <= WARMUP_BATCHES:
        parser.error(f"--batches {args.batches} leaves nothing to time: the first {WARMUP_BATCHES} are warm-up")
    args.backbones = args.backbones or (["resnet18"] if args.synthetic else ["resnet32", "resnet18_cifar"])
    if args.synthetic:
        args.workers = []  # random tensors in memory: no loader measurement
        size = args.image_size
        data = f"synthetic: {args.synthetic} random uint8 images 3x{size}x{size}, {args.classes} classes"
    else:
        data = f"CIFAR-10, {args.per_class} images per class, in-memory uint8"

    setting = {
        "machine": machine(),
        "batch_size": args.batch_size,
        "data": data,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "gpu_augmentation": args.gpu_augmentation,
        "train_workers": args.train_workers,
        "batches": args.batches,
        "accelerator": args.accelerator,
        "precision": args.precision,
    }
    rows = []
    for batch_size in args.batch_size:
        for workers in args.workers:
            rows.append(
                {
                    "what": "data loader (CIFAR aug)",
                    "batch_size": batch_size,
                    "workers": workers,
                    "images_per_s": loader_throughput(args, workers, batch_size),
                }
            )
        for backbone in args.backbones:
            for name in args.methods:
                method = METHODS[name]
                step, ceiling = training_throughput(args, backbone, method, batch_size)
                rows.append(
                    {
                        "what": f"{method.__name__} training step, {backbone}",
                        "batch_size": batch_size,
                        "workers": args.train_workers,
                        "images_per_s": step,
                        **({"ceiling_images_per_s": ceiling} if args.ceiling else {}),
                    }
                )
    print(f"setting: {json.dumps(setting)}")
    print(f"{'measurement':<44}{'batch':>7}{'workers':>8}{'images/s':>12}{'ceiling':>12}")
    for row in rows:
        ceiling = f"{row['ceiling_images_per_s']:>12.0f}" if "ceiling_images_per_s" in row else ""
        print(f"{row['what']:<44}{row['batch_size']:>7}{row['workers']:>8}{row['images_per_s']:>12.0f}{ceiling}")
    write_result(args.out, {"setting": setting, "results": rows})


if __name__ == "__main__":
    main()
