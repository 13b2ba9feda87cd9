"""Where a whole stream's wall time goes, task by task: fit set-up, training steps, fit teardown, task-end work,
evaluation, and the checkpoint + next task's start; with the network's compute ceiling and inference speed
measured in the same process, and the inference floor of the evaluation and task-end passes.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/stream_profile.py --config configs/finetune_cifar10.yaml \
        --root <cifar10> -- --data.max_train_per_class 200 --model.init_args.backbone resnet32 ...

Everything after ``--`` is passed to the config as command-line overrides (the same shrinking the tests use). The
config runs in this process (``LightningCILCLI(run=False)`` + ``run_stream``) with a ``StreamProfiler`` callback.

- ceiling: forward + backward images/s of the method's network (backbone + head) on one fixed batch of the
  configured size; inference: forward images/s in eval mode without gradients. Both measured at the start of
  every task's fit (outside its timed parts), on a copy of the network as it is then (for DER: one extractor), so
  that each task's training and floors are set against the machine's speed of that moment: a shared machine's
  speed drifts by tens of percent over minutes.
- the method's ceiling of a task: the same network's forward + backward for every training image plus, at the
  inference speed, the forward passes of the frozen networks the method's training step runs on it (a teacher's, DER's
  old extractors'; counted from the training steps' hooks); the training share of it is the goal of >= 90%.
- the inference floor of a part is (images the backbone ran on in that part, counted per extractor for DER, per
  ViT pass for the pre-trained-model methods) / inference images/s: what the passes cost at the network's own
  speed, against what the part took. (Counted from the stream's hooks: a DER extractor rebuilt by pruning at a
  task end is counted from the next evaluation on.)

Prints a table and writes benchmarks/results/stream_profile_<method>.json.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import lightning as L
import torch
from harness import machine, write_result  # benchmarks/harness.py
from torch import nn

from lightning_cil.lightning_cli import LightningCILCLI
from lightning_cil.stream import run_stream

PARTS = ("setup", "train", "teardown", "task_end", "evaluation", "checkpoint_and_next_start")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StreamProfiler(L.Callback):
    """Timestamps of the stream's events, per task, and the images the backbone ran on outside training."""

    def __init__(self, measure=None) -> None:
        #: (module) -> (ceiling, inference) images/s, measured at each fit's start
        self.measure = measure
        self.tasks: list[dict] = []
        self._marks: dict[str, float] = {}
        self._images_outside_training = 0
        self._frozen_images_in_training = 0
        self._training = False
        self._hooked: set[int] = set()

    # -- counting backbone passes outside training (task end, evaluation)
    def _hook(self, pl_module) -> None:
        """Count at the first module of every pass: a ViT's patch embedding (the prompt methods run its blocks
        themselves), each of DER's extractors (evaluation may run only some of them), else the backbone."""
        backbone = pl_module.backbone
        if hasattr(backbone, "patch_embed"):
            modules = [backbone.patch_embed]
        else:
            modules = list(getattr(backbone, "extractors", [backbone]))
        for module in modules:
            if id(module) not in self._hooked:
                self._hooked.add(id(module))
                module.register_forward_pre_hook(self._count)

    def _hook_frozen(self, pl_module) -> None:
        """Count the frozen networks' passes in training steps: a teacher (``old_model``), DER's old extractors."""
        extractors = list(getattr(pl_module.backbone, "extractors", []))[:-1]
        teacher = getattr(pl_module, "old_model", None)
        for module in [*extractors, *([teacher] if isinstance(teacher, nn.Module) else [])]:
            if ("frozen", id(module)) not in self._hooked:
                self._hooked.add(("frozen", id(module)))
                module.register_forward_pre_hook(self._count_frozen)

    def _count(self, module: nn.Module, inputs) -> None:
        if not self._training:
            self._images_outside_training += len(inputs[0])

    def _count_frozen(self, module: nn.Module, inputs) -> None:
        if self._training:
            self._frozen_images_in_training += len(inputs[0])

    def _now(self) -> float:
        _sync()
        return time.perf_counter()

    def _task(self, pl_module) -> dict:
        index = pl_module.task_index
        while len(self.tasks) <= index:
            self.tasks.append({"task": len(self.tasks), **{p: 0.0 for p in PARTS}, "train_images": 0})
        return self.tasks[index]

    def setup(self, trainer, pl_module, stage: str) -> None:
        now = self._now()
        self._hook(pl_module)
        task = self._task(pl_module)
        if stage == "fit":
            if "after_test" in self._marks and task["task"] > 0:
                self.tasks[task["task"] - 1]["checkpoint_and_next_start"] += now - self._marks.pop("after_test")
            if self.measure is not None and "ceiling" not in task:
                with torch.random.fork_rng():
                    task["ceiling"], task["inference"] = self.measure(pl_module)
                now = self._now()
            self._marks["fit_setup"] = now
        elif stage == "test":
            task["task_end"] += now - self._marks.pop("fit_teardown", now)
            task["task_end_images"] = self._images_outside_training
            self._images_outside_training = 0
            self._marks["test_setup"] = now

    def on_train_start(self, trainer, pl_module) -> None:
        self._hook_frozen(pl_module)
        self._training = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        task = self._task(pl_module)
        now = self._now()
        if "fit_setup" in self._marks:
            task["setup"] += now - self._marks.pop("fit_setup")
            self._marks["train_start"] = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._task(pl_module)["train_images"] += len(batch[1])
        self._marks["last_batch_end"] = self._now()

    def on_train_end(self, trainer, pl_module) -> None:
        self._training = False
        task = self._task(pl_module)
        task["train"] += self._marks["last_batch_end"] - self._marks.pop("train_start")
        task["frozen_images_in_training"] = task.get("frozen_images_in_training", 0) + self._frozen_images_in_training
        self._frozen_images_in_training = 0
        self._marks["train_end"] = self._marks.pop("last_batch_end")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        now = self._now()
        task = self._task(pl_module)
        if stage == "fit":
            task["teardown"] += now - self._marks.pop("train_end", now)
            self._marks["fit_teardown"] = now
            self._images_outside_training = 0  # phases of one task: count only after the last fit
        elif stage == "test":
            task["evaluation"] += now - self._marks.pop("test_setup")
            task["evaluation_images"] = self._images_outside_training
            self._images_outside_training = 0
            self._marks["after_test"] = now


def _speeds(model: nn.Module, image: torch.Tensor, batch: int, steps: int = 8) -> tuple[float, float]:
    """(training images/s, inference images/s) of ``model`` on one fixed batch, after 2 warm-up steps."""
    backbone = model.backbone
    if hasattr(backbone, "extractors"):  # DER: one extractor, the network every task adds
        backbone = backbone.extractors[0]
    net = copy.deepcopy(backbone).eval().requires_grad_(True)  # an old extractor is frozen: train it here
    with torch.no_grad():  # the extractor's own feature width (DER's backbone concatenates its extractors')
        width = net(image[None]).shape[1]
    net = nn.Sequential(net, nn.Linear(width, 10))
    x = image.expand(batch, *image.shape).contiguous()
    y = torch.zeros(batch, dtype=torch.long)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    net.train()
    for i in range(steps + 2):
        if i == 2:
            _sync()
            start = time.perf_counter()
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    _sync()
    train = batch * steps / (time.perf_counter() - start)
    net.eval()
    with torch.no_grad():
        for i in range(steps + 2):
            if i == 2:
                _sync()
                start = time.perf_counter()
            net(x)
    _sync()
    return train, batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--root", help="data.root")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/stream_profile_<method>.json)")
    parser.add_argument(
        "--no-feature-cache",
        action="store_true",
        help="recompute frozen networks' test features at every evaluation (the stream before the cache)",
    )
    parser.add_argument("overrides", nargs="*", help="after --: overrides of the config")
    args = parser.parse_args()
    cli_args = ["--config", args.config, *(["--data.root", args.root] if args.root else []), *args.overrides]
    cli = LightningCILCLI(args=cli_args, run=False)
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    model.cache_frozen_features = not args.no_feature_cache
    datamodule.use_backbone_defaults(model.backbone_data_config())
    datamodule.prepare_stream()
    image = datamodule.test_transform(datamodule.splits.train.image(0))
    ceiling, inference = _speeds(model, image, datamodule.hparams.batch_size)
    profiler = StreamProfiler(lambda module: _speeds(module, image, datamodule.hparams.batch_size))
    trainer.callbacks.append(profiler)
    started = time.perf_counter()
    run_stream(trainer, model, datamodule)
    wall = time.perf_counter() - started

    rows = []
    for task in profiler.tasks:
        task_ceiling, task_inference = task.get("ceiling", ceiling), task.get("inference", inference)
        outside = task.get("task_end_images", 0) + task.get("evaluation_images", 0)
        floor = outside / task_inference
        # the method's ceiling: forward + backward per training image, plus its frozen networks' forwards
        frozen_per_image = task.get("frozen_images_in_training", 0) / max(task["train_images"], 1)
        method_ceiling = 1 / (1 / task_ceiling + frozen_per_image / task_inference)
        row = {
            **{k: round(v, 2) if isinstance(v, float) else v for k, v in task.items()},
            "train_images_per_s": round(task["train_images"] / max(task["train"], 1e-9), 1),
            "frozen_passes_per_train_image": round(frozen_per_image, 3),
            "method_ceiling_images_per_s": round(method_ceiling, 1),
            "ideal_train_s": round(task["train_images"] / method_ceiling, 2),
            "non_training_s": round(sum(task[p] for p in PARTS if p != "train"), 2),
            "inference_floor_s": round(floor, 2),
        }
        rows.append(row)
    header = f"{'task':>4} " + " ".join(f"{p[:12]:>12}" for p in PARTS) + f" {'train img/s':>11} {'floor s':>8}"
    print(header)
    for row in rows:
        print(
            f"{row['task']:>4} "
            + " ".join(f"{row[p]:>12.2f}" for p in PARTS)
            + f" {row['train_images_per_s']:>11.1f} {row['inference_floor_s']:>8.2f}"
        )
    train = sum(r["train"] for r in rows)
    non_training = sum(r["non_training_s"] for r in rows)
    floor = sum(r["inference_floor_s"] for r in rows)
    images = sum(r["train_images"] for r in rows)
    summary = {
        "wall_s": round(wall, 2),
        "train_s": round(train, 2),
        "non_training_s": round(non_training, 2),
        "non_training_share_of_wall": round(non_training / wall, 3),
        "inference_floor_s": round(floor, 2),
        "non_training_over_floor": round(non_training / floor, 2) if floor else None,
        "train_images_per_s": round(images / train, 1),
        "ceiling_train_images_per_s_before_stream": round(ceiling, 1),
        "ceiling_train_images_per_s_per_task": [round(r.get("ceiling", ceiling), 1) for r in rows],
        "train_share_of_method_ceiling": round(sum(r["ideal_train_s"] for r in rows) / train, 3),
        "inference_images_per_s_before_stream": round(inference, 1),
    }
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    method = type(model).__name__
    write_result(
        args.out or Path(__file__).parent / "results" / f"stream_profile_{method}.json",
        {
            "method": method,
            "command": " ".join(["python benchmarks/stream_profile.py --config", args.config, "--", *args.overrides]),
            "machine": machine(),
            "loader_workers": datamodule.hparams.num_workers,
            "feature_cache": model.cache_frozen_features,
            "summary": summary,
            "tasks": rows,
        },
    )


if __name__ == "__main__":
    main()
