"""Piggyback and PackNet on PACS against their references: accuracy per domain, and what each task costs to store.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/pacs_masks.py --cifar10 <cifar10> --pacs <pacs>
    OMP_WAIT_POLICY=PASSIVE python benchmarks/pacs_masks.py --pacs <pacs> --pretrained <backbone .ckpt>

First trains the backbone with ``configs/backbone_cifar10.yaml`` (unless ``--pretrained`` is given), then runs
``configs/piggyback_pacs.yaml`` and ``configs/packnet_pacs.yaml`` through the CLI, shrunk by the same overrides as
``tests/methods/test_piggyback_packnet.py``, for: the classifier-only baseline (frozen backbone, new head),
Piggyback, Piggyback with task-specific BatchNorm, PackNet, and, as the upper reference, one individually
fine-tuned network per domain (the whole backbone and a new head, from the same pretrained weights). Prints a
table and writes benchmarks/results/pacs_masks.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import lightning as L
import torch
from harness import machine, write_result  # benchmarks/harness.py

from lightning_cil import Finetune, Piggyback, TaskSchedule, TaskStreamDataModule, run_stream
from lightning_cil.cli import LightningCILCLI
from lightning_cil.networks.pretrained import load_pretrained
from lightning_cil.networks.weight_masks import masked_layers

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ["art_painting", "cartoon", "sketch"]
SEED = 1993

BACKBONE = [
    "--data.max_train_per_class", "300",
    "--data.max_test_per_class", "100",
    "--data.batch_size", "64",
    "--model.init_args.schedule", "{epochs: 10, lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4, milestones: [7]}",
]  # fmt: skip
PACS = ["--data.max_train_per_class", "80", "--data.max_test_per_class", "40"]
ADAM = {"epochs": 8, "lr": 1.0e-3, "optimizer": "adam", "weight_decay": 0.0, "milestones": [6]}
VARIANTS = {
    "classifier only": ("piggyback_pacs", ["--model.init_args.train_masks", "false"]),
    "Piggyback": ("piggyback_pacs", ["--model.init_args.mask_lr", "1.0e-4"]),
    "Piggyback + task BN": (
        "piggyback_pacs",
        ["--model.init_args.mask_lr", "1.0e-4", "--model.init_args.task_batchnorm", "true"],
    ),
    "PackNet": ("packnet_pacs", ["--model.init_args.retrain_epochs", "2"]),
}
REFERENCE = "individual fine-tuned networks"


def fit(config: str, root: str, work: Path, *overrides: str) -> Path:
    """One CLI run; returns its log folder."""
    name = work.name
    LightningCILCLI(
        args=[
            "fit",
            "--config",
            str(REPO / "configs" / f"{config}.yaml"),
            "--data.root",
            root,
            "--data.num_workers",
            "0",
            "--trainer.deterministic",
            "true",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(work),
            "--trainer.logger.init_args.save_dir",
            str(work.parent),
            "--trainer.logger.init_args.name",
            name,
            *overrides,
        ]  # fmt: skip
    )
    return max((work.parent / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def fine_tuned_reference(args, pretrained: str, work: Path) -> list[float]:
    """One network per domain: the pretrained backbone and a new head, all trained on that domain alone."""
    accuracies = []
    for domain in DOMAINS:
        L.seed_everything(SEED)
        datamodule = TaskStreamDataModule(
            dataset="domains",
            root=args.pacs,
            domains=[domain],
            initial_classes=7,
            augmentation="small32",
            batch_size=32,
            num_workers=0,
            max_train_per_class=80,
            max_test_per_class=40,
        )
        model = Finetune(backbone="resnet20", schedule=TaskSchedule(**ADAM))
        load_pretrained(model.backbone, pretrained)
        trainer = L.Trainer(
            accelerator="auto",
            devices=1,
            deterministic=True,
            enable_progress_bar=False,
            logger=L.pytorch.loggers.CSVLogger(str(work), name=domain),
            default_root_dir=str(work / domain),
        )
        summary = run_stream(trainer, model, datamodule)
        accuracies.append(100 * summary["cnn"]["last_accuracy"])  # the stream's summary holds fractions
    return accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pacs", required=True, help="PACS folder: <domain>/<class>/<image>")
    parser.add_argument("--cifar10", help="CIFAR-10 ImageFolder tree, to train the backbone")
    parser.add_argument("--pretrained", help="a backbone checkpoint instead of training one")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[*VARIANTS, REFERENCE],
        choices=[*VARIANTS, REFERENCE],
        help="rows to run (default: all)",
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "pacs_masks.json"))
    parser.add_argument("--work-dir", default="runs/benchmarks/pacs_masks")
    args = parser.parse_args()
    work = Path(args.work_dir)
    pretrained = args.pretrained
    backbone_accuracy = None
    if pretrained is None:
        if not args.cifar10:
            parser.error("give --cifar10 (to train the backbone) or --pretrained")
        run = fit("backbone_cifar10", args.cifar10, work / "backbone", *BACKBONE)
        backbone_accuracy = json.loads((run / "metrics.json").read_text())["summary"]["last_accuracy"]
        pretrained = str(run / "checkpoints" / "last.ckpt")

    schedule = ["--model.init_args.schedule", json.dumps(ADAM), "--model.init_args.pretrained", pretrained]
    rows = {}
    for name, (config, options) in VARIANTS.items():
        if name not in args.variants:
            continue
        start = time.perf_counter()
        run = fit(config, args.pacs, work / name.replace(" ", "_").replace("+", "and"), *PACS, *schedule, *options)
        metrics = json.loads((run / "metrics.json").read_text())
        state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["state_dict"]
        rows[name] = {
            "accuracy": metrics["scorers"]["cnn"]["accuracy_matrix"][-1],
            "wall_seconds": time.perf_counter() - start,
            "mask_bytes_per_task": state["task_masks"].shape[1] if "task_masks" in state else None,
        }
    if REFERENCE in args.variants:
        start = time.perf_counter()
        rows[REFERENCE] = {
            "accuracy": fine_tuned_reference(args, pretrained, work / "fine_tuned"),
            "wall_seconds": time.perf_counter() - start,
            "mask_bytes_per_task": None,
        }

    weights = sum(
        m.parametrizations.weight.original.numel() for _, m in masked_layers(Piggyback(backbone="resnet20").backbone)
    )
    print(f"\nPACS, task-incremental, ResNet-20 pretrained on CIFAR-10 (backbone accuracy {backbone_accuracy})")
    print("| variant | " + " | ".join(DOMAINS) + " | mean | extra storage per task |")
    print("| --- | " + " | ".join("---" for _ in DOMAINS) + " | --- | --- |")
    for name, row in rows.items():
        acc = row["accuracy"]
        if row["mask_bytes_per_task"]:
            storage = f"{row['mask_bytes_per_task']:,} B mask (ceil({weights:,}/8) = {math.ceil(weights / 8):,})"
        elif name == "PackNet":
            storage = "none (1-byte owner map shared by all tasks)"
        elif name == REFERENCE:
            storage = "a whole network"
        else:
            storage = "head only"
        cells = " | ".join(f"{a:.1f}" for a in acc)
        print(f"| {name} | {cells} | {sum(acc) / len(acc):.1f} | {storage} |")
    result = {
        "settings": {"domains": DOMAINS, "seed": SEED, "pacs_overrides": PACS, "schedule": ADAM, "backbone": BACKBONE},
        "machine": machine(),
        "backbone_accuracy": backbone_accuracy,
        "rows": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
