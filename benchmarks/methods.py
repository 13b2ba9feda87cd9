"""Training speed of every method, task by task: images/s, time per task as the model and memory grow, peak memory.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/methods.py --root <cifar10>              # CPU-sized defaults
    python benchmarks/methods.py --root <cifar100> --dataset cifar100 --protocol B0_Inc10 --per-class 500 \\
        --backbone resnet32 --epochs 2 --accelerator gpu --precision bf16-mixed --channels-last \\
        --gpu-augmentation --workers 8                                               # a GPU

Every method trains the same stream (default: CIFAR-10 in 5 tasks of 2 classes, 200 train images per class,
ResNet-20, 1 epoch per task, batch 128, 200 exemplars for rehearsal methods), each in a process of its own so
that the peak resident memory on a CPU is its own. Piggyback and PackNet run it as a task-incremental stream
from random weights (their speed does not depend on the pretraining); PackNet needs 2 epochs per task (it
prunes before its retraining epoch). Per task it records, with ``der_growth.CostMeter``:

- step images/s: training steps after the first batch (data loading excluded);
- fit images/s and fit seconds: the whole ``trainer.fit`` of the task (loading and Lightning included);
- task end seconds: the method's task-end work (memory, Fisher, pruning, balancing) plus the evaluation;
- peak memory: CUDA peak allocated in the fit, or the process's peak resident set size on a CPU.

Prints a table and writes benchmarks/results/methods.json (settings, thread and loader counts, load average).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import machine, speed_callbacks, write_result  # benchmarks/harness.py

HERE = Path(__file__).resolve().parent
#: command-line name -> class in lightning_cil.methods
METHODS = {
    "finetune": "Finetune",
    "joint": "Joint",
    "lwf": "LwF",
    "ewc": "EWC",
    "icarl": "ICaRL",
    "wa": "WA",
    "bic": "BiC",
    "der": "DER",
    "piggyback": "Piggyback",
    "packnet": "PackNet",
}


def _child(args: argparse.Namespace) -> None:
    """Run one method's stream in this process and write its per-task rows as JSON to ``args.result``."""
    import lightning as L
    import torch

    sys.path.insert(0, str(HERE))
    from der_growth import CostMeter

    import lightning_cil.methods as methods
    from lightning_cil import TaskSchedule, TaskStreamDataModule, run_stream
    from lightning_cil.stream import StreamCallback

    class TaskEndTimer(StreamCallback):
        """Seconds from the end of a task's fit to the end of its evaluation (the task-end work + testing)."""

        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_train_end(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()

        def on_task_evaluated(self, trainer, pl_module, stream, task) -> None:
            self.seconds.append(time.perf_counter() - self.start)

    name = args.child
    cls = getattr(methods, METHODS[name])
    masked = name in ("piggyback", "packnet")
    epochs = max(args.epochs, 2) if name == "packnet" else args.epochs
    options = {"memory_budget": args.memory} if name in ("icarl", "wa", "bic", "der") else {}
    if name == "packnet":
        options["retrain_epochs"] = 1
    L.seed_everything(0)
    model = cls(backbone=args.backbone, schedule=TaskSchedule(epochs=epochs, lr=0.05, milestones=[]), **options)
    dm = TaskStreamDataModule(
        dataset=args.dataset,
        root=args.root,
        scenario="task" if masked else "class",
        protocol=args.protocol,
        class_order_seed=None,
        batch_size=args.batch_size,
        num_workers=args.workers,
        max_train_per_class=args.per_class,
        max_test_per_class=args.test_per_class,
        gpu_augmentation=args.gpu_augmentation,
    )
    meter, timer = CostMeter(warmup=1), TaskEndTimer()
    callbacks = [meter, timer, *speed_callbacks(args.channels_last, args.compile)]
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        default_root_dir=tempfile.mkdtemp(prefix="methods_bench_"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    run_stream(trainer, model, dm)
    wall = time.perf_counter() - start
    rows = [{**row, "task_end_seconds": end} for row, end in zip(meter.rows, timer.seconds)]
    result = {"method": cls.__name__, "epochs_per_task": epochs, "stream_seconds": wall, "tasks": rows}
    result["torch_threads"] = torch.get_num_threads()
    Path(args.result).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="CIFAR folder: train/<class> + test/<class>, or pickles")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--protocol", default="B0_Inc2")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--per-class", type=int, default=200, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per task (PackNet: at least 2)")
    parser.add_argument("--memory", type=int, default=200, help="exemplars of rehearsal methods")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--channels-last", action="store_true", help="the ChannelsLast callback")
    parser.add_argument("--compile", action="store_true", help="the CompileBackbone callback")
    parser.add_argument("--gpu-augmentation", action="store_true", help="data.gpu_augmentation")
    parser.add_argument("--out", default=str(HERE / "results" / "methods.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)

    settings = {k: v for k, v in vars(args).items() if k not in ("root", "out", "child", "result", "methods")}
    settings["machine"] = machine()
    results = []
    for method in args.methods:
        with tempfile.TemporaryDirectory() as tmp:
            result_file = Path(tmp) / "result.json"
            command = [sys.executable, __file__, *sys.argv[1:], "--child", method, "--result", str(result_file)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(result_file.read_text()))
        settings["torch_threads"] = results[-1]["torch_threads"]
        print(f"{method}: {results[-1]['stream_seconds']:.1f} s", flush=True)

    print(f"\nsettings: {json.dumps(settings)}")
    print("| method | task | extractors | step images/s | fit images/s | fit s | task end + eval s | peak memory MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for result in results:
        for r in result["tasks"]:
            step = f"{r['images_per_second']:.0f}" if r["images_per_second"] else "-"
            print(
                f"| {result['method']} | {r['task']} | {r['extractors']} | {step} | {r['fit_images_per_second']:.0f} | "
                f"{r['fit_seconds']:.1f} | {r['task_end_seconds']:.1f} | {r['peak_memory_mib']:.0f} |"
            )
    print("\n| method | stream s | mean step images/s | mean fit images/s |")
    print("| --- | ---: | ---: | ---: |")
    for result in results:
        steps = [r["images_per_second"] for r in result["tasks"] if r["images_per_second"]]
        fits = [r["fit_images_per_second"] for r in result["tasks"]]
        mean_step = f"{sum(steps) / len(steps):.0f}" if steps else "-"
        print(f"| {result['method']} | {result['stream_seconds']:.0f} | {mean_step} | {sum(fits) / len(fits):.0f} |")
    write_result(args.out, {"settings": settings, "results": results})


if __name__ == "__main__":
    main()
