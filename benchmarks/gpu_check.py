"""The GPU check: one prepared run that tests the GPU paths and measures them on one GPU in under 9 minutes.

    python benchmarks/gpu_check.py --prepare                 # once, where the shared data and a registry are:
                                                             #   .gpu_data/ (CIFAR-10 archive), .whl/ (CLI wheels)
    bash benchmarks/gpu_check.sh --out <dir>                 # on the GPU machine (see benchmarks/README.md)
    python benchmarks/gpu_check.py --dry-run --out <dir>     # every step on the CPU, tiny sizes

Each step runs in a process of its own under a time budget; one that runs out of time is killed and recorded as
``timed out``, and the next step starts. Results are written as each step ends: ``<dir>/gpu_check.json`` (every
step's status, seconds, budget and result, and the machine) and one JSON file per step, each with the machine record
of ``benchmarks/harness.py``; logs in ``<dir>/logs/``. The steps:

1. ``data``: the CIFAR-10 JPEG archive decoded once into CIFAR's pickle layout (``cifar-10-batches-py``) in a
   scratch folder, which every later process loads without decoding.
2. ``gpu_tests``: ``pytest -m gpu tests/methods/test_gpu.py`` (16-mixed with a GradScaler and a resumed loss scale,
   bf16-mixed, ChannelsLast + CompileBackbone, device augmentation, pinned batches).
3. ``throughput``: training images/s of the second task with device augmentation, for ResNet-32 iCaRL and
   ResNet-18 (CIFAR stem) DER in fp32 and bf16 at batch 128 and 512, and ResNet-18 at 224 px on random
   ImageNet-shaped batches in bf16; each beside its compute ceiling (a fixed batch on the device, no loader).
   ``throughput_compile``: the same CIFAR rows with bf16 + ChannelsLast + CompileBackbone. Both reuse
   ``benchmarks/throughput.py`` and write a row as soon as it is measured, so a timeout keeps what was done.
4. ``loader``: ``benchmarks/loader.py --device cuda`` on 400 ImageNet-shaped JPEGs made from the archive's images:
   images/s per core of PIL, the image codec's CPU decoders (TorchCodec, torchvision) and the stream's loader,
   against the loader with ``data.decode_on_device`` (nvJPEG), batch 128; and with ``device_decoder: dali`` where
   DALI is installed.
5. ``accuracy``: ``configs/icarl_cifar10.yaml`` (Split CIFAR-10, 5 x 2, natural order, ResNet-18, 200 exemplars)
   through the CLI, with fewer epochs per task than the protocol's (stated in the result), against the published
   49.02% (Mammoth, Seq-CIFAR-10, class-IL).

The dry run uses tiny sizes and ResNet-20 models and turns ``torch.compile`` into a no-op (``TORCH_COMPILE_DISABLE``):
it checks that every step runs and writes its result, not any number.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO / ".gpu_data"
WHEELS = REPO / ".whl"
ARCHIVE = "cifar10-jpg.tar.gz"
#: where ``--prepare`` finds the archive by default: the shared data folder beside the repository
SHARED_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10" / ARCHIVE
#: the dependencies that the GPU machine lacks (versions tested with lightning 2.6.6): the CLI's, torchdata (the
#: stateful training loader) and TorchCodec (the image codec; where its library does not load with that machine's
#: torch, torchvision's decoders run, and the loader step's result names the codec that ran)
CLI_WHEELS = [
    "jsonargparse==4.53.0",
    "docstring-parser==0.18.0",
    "typeshed-client==2.15.0",
    "torchdata==0.11.0",
    "torchcodec==0.17.0",
]

#: per-step time budgets in seconds on the GPU; together they stay under the 9-minute total
BUDGETS = {"data": 40, "gpu_tests": 125, "throughput": 80, "throughput_compile": 100, "loader": 45, "accuracy": 120}
TOTAL_BUDGET = 510
#: the published class-IL accuracy of iCaRL, buffer 200, on Seq-CIFAR-10 (Mammoth / DER++ paper, Table 2)
PUBLISHED = {"last_accuracy": 49.02, "source": "Mammoth Seq-CIFAR-10, class-IL, iCaRL, buffer 200"}

#: (name, precision, channels_last, compile) of the CIFAR throughput rows
EAGER_VARIANTS = [("fp32 eager", "32-true", False, False), ("bf16", "bf16-mixed", False, False)]
COMPILE_VARIANTS = [("bf16 + channels-last + compile", "bf16-mixed", True, True)]


def _sizes(dry_run: bool) -> dict[str, Any]:
    """Everything that differs between the GPU run and the dry run."""
    if dry_run:
        return {
            "accelerator": "cpu",
            "train_per_class": 40,
            "test_per_class": 10,
            "cifar_models": [("icarl", "resnet20"), ("der", "resnet20")],
            "batch_sizes": [4],  # the GPU run has two
            "batches": 4,
            "train_workers": 0,
            "imagenet": {"backbone": "resnet18", "image_size": 32, "classes": 10, "batch_size": 8, "images": 64},
            "budget_scale": 3,  # a small shared CPU: imports alone take tens of seconds
            # bf16 autocast on a CPU builds its kernels during the first batches: tens of seconds per tiny row
            "precision": "32-true",
            "accuracy_epochs": 1,
            "accuracy_overrides": [
                "--trainer.accelerator",
                "cpu",
                "--model.init_args.backbone",
                "resnet20",
                "--data.max_train_per_class",
                "10",
                "--data.max_test_per_class",
                "5",
                "--model.init_args.memory_budget",
                "20",
            ],  # fmt: skip
            "accuracy_workers": 0,
            "loader": {"count": 40, "repeats": 1, "batch_size": 8, "device": "cpu"},
        }
    return {
        "accelerator": "gpu",
        "train_per_class": None,  # all 5,000 / 1,000
        "test_per_class": None,
        "cifar_models": [("icarl", "resnet32"), ("der", "resnet18_cifar")],
        "batch_sizes": [128, 512],
        "batches": 16,  # 3 warm-up + 13 timed; 16 x 512 fits the 10,000 images of a task
        "train_workers": 2,
        # batch 256 as the ImageNet configs' 8 x 32; random images gathered in-process (no shared-memory transfers)
        "imagenet": {"backbone": "resnet18", "image_size": 224, "classes": 1000, "batch_size": 256, "images": 4096},
        "budget_scale": 1,
        "precision": None,  # each row's own
        "accuracy_epochs": 5,
        "accuracy_overrides": [],
        "accuracy_workers": 6,
        "loader": {"count": 400, "repeats": 2, "batch_size": 128, "device": "cuda"},
    }


# --------------------------------------------------------------------------- preparing the carried files


def prepare(archive: Path) -> None:
    """Copy the CIFAR-10 archive into .gpu_data/ and download the CLI's wheels into .whl/ (both git-ignored)."""
    if not archive.is_file():
        raise SystemExit(f"--cifar10 {archive}: no such file; give the path of {ARCHIVE} (the CIFAR-10 JPEG archive)")
    DATA.mkdir(exist_ok=True)
    shutil.copyfile(archive, DATA / ARCHIVE)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    subprocess.run([*command, "-d", str(WHEELS), *CLI_WHEELS], check=True)
    sizes = {path.name: path.stat().st_size for folder in (DATA, WHEELS) for path in sorted(folder.iterdir())}
    print(json.dumps(sizes, indent=1))
    print(f"carried in all: {sum(sizes.values()) / 2**20:.1f} MiB")


# --------------------------------------------------------------------------- step children (run in their own process)


def cifar_pickles(archive: Path, dest: Path, train_per_class: int | None, test_per_class: int | None) -> dict:
    """Decode the JPEG archive (train/<class>/*.jpg, test/<class>/*.jpg) into CIFAR's pickle layout under ``dest``.

    The pixels are those the folder loader reads (PIL, RGB); classes in alphabetical order, CIFAR-10's own order.
    """
    import numpy as np
    from PIL import Image

    images: dict[str, list] = {"train": [], "test": []}
    labels: dict[str, list] = {"train": [], "test": []}
    limits = {"train": train_per_class, "test": test_per_class}
    counts: dict[tuple[str, str], int] = {}
    classes: list[str] = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in images:
                continue
            split, name = parts[0], parts[1]
            if limits[split] is not None and counts.get((split, name), 0) >= limits[split]:
                continue
            counts[split, name] = counts.get((split, name), 0) + 1
            if name not in classes:
                classes.append(name)
            with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                images[split].append(np.asarray(image.convert("RGB")).transpose(2, 0, 1).reshape(-1))
            labels[split].append(name)
    classes.sort()
    folder = dest / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def write(name: str, data: Any) -> None:
        with open(folder / name, "wb") as handle:
            pickle.dump(data, handle, protocol=4)

    train_x, test_x = np.stack(images["train"]), np.stack(images["test"])
    train_y = [classes.index(n) for n in labels["train"]]
    for i, part in enumerate(np.array_split(np.arange(len(train_y)), 5), start=1):
        write(f"data_batch_{i}", {"data": train_x[part], "labels": [train_y[j] for j in part]})
    write("test_batch", {"data": test_x, "labels": [classes.index(n) for n in labels["test"]]})
    write("batches.meta", {"label_names": classes})
    return {"classes": classes, "train_images": len(train_y), "test_images": len(test_x), "root": str(dest)}


def throughput_rows(plan: dict, out: Path) -> None:
    """Measure every row of ``plan`` with benchmarks/throughput.py, rewriting ``out`` after each row."""
    import throughput
    import torch
    from harness import machine, write_result

    result = {"machine": machine(), "setting": plan["setting"], "rows": [], "complete": False}
    for row in plan["rows"]:
        args = argparse.Namespace(**plan["setting"], **row)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if row["compile"]:
            torch._dynamo.reset()  # each compiled row starts cold (one row's graphs do not count against the next's)
        start = time.perf_counter()
        try:
            step, ceiling = throughput.training_throughput(
                args, row["backbone"], throughput.METHODS[row["method"]], row["batch_size"]
            )
            measured = {"images_per_s": round(step, 1), "ceiling_images_per_s": round(ceiling, 1)}
        except Exception as error:  # one failing row (a compiler error, memory) must not lose the others
            traceback.print_exc()  # into the step's log
            measured = {"error": f"{type(error).__name__}: {str(error)[:500]}"}
        measured["seconds"] = round(time.perf_counter() - start, 1)
        if row["compile"]:  # how much was compiled: no graphs means the row ran eagerly
            from torch._dynamo.utils import counters

            measured["dynamo_stats"] = {key: int(value) for key, value in counters["stats"].items()}
        if torch.cuda.is_available():
            measured["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["rows"].append({**row, **measured})
        print(json.dumps(result["rows"][-1]), flush=True)
        write_result(out, result)
    result["complete"] = True
    write_result(out, result)


# --------------------------------------------------------------------------- the orchestrator


class Check:
    """Runs the steps, each in a process group of its own with a timeout, and writes the results as they come."""

    def __init__(self, out: Path, dry_run: bool, total_budget: float, scale: float) -> None:
        from harness import machine

        self.out, self.dry_run, self.scale = out, dry_run, scale
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.start, self.total_budget = time.perf_counter(), total_budget
        self.machine = machine()
        self.summary: dict[str, Any] = {
            "dry_run": dry_run,
            "machine": self.machine,
            "total_budget_s": total_budget,
            "steps": {},
        }

    def remaining(self) -> float:
        return self.total_budget - (time.perf_counter() - self.start)

    def run(self, name: str, command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
        """Run ``command`` for at most the step's budget (less if the total budget runs short); log its output.
        The children import this checkout's lightning_cil (not an installed copy): the repository leads PYTHONPATH."""
        budget = min(BUDGETS[name] * self.scale, self.remaining() - 5)
        if budget < 5:
            return {"status": "not run: the total budget was spent", "seconds": 0.0}
        log = self.logs / f"{name}.log"
        print(f"[{name}] budget {budget:.0f} s: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        with open(log, "w") as handle:
            process = subprocess.Popen(
                command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=_child_env(env), start_new_session=True,
            )  # fmt: skip
            try:
                returncode = process.wait(timeout=budget)
                status = "passed" if returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the step and its loader workers
                process.wait()
                returncode, status = None, "timed out"
        seconds = round(time.perf_counter() - start, 1)
        print(f"[{name}] {status} in {seconds} s (log: {log.relative_to(self.out)})", flush=True)
        return {"status": status, "returncode": returncode, "seconds": seconds, "budget_s": round(budget, 1),
                "log": str(log.relative_to(self.out))}  # fmt: skip

    def record(self, name: str, outcome: dict[str, Any], result: dict[str, Any] | None = None) -> None:
        """Store a step's outcome (and its own JSON file), and rewrite gpu_check.json."""
        from harness import write_result

        if result is not None:
            write_result(self.out / f"{name}.json", {"machine": self.machine, **result})
            outcome["result_file"] = f"{name}.json"
            outcome["result"] = result
        self.summary["steps"][name] = outcome
        self.summary["total_seconds"] = round(time.perf_counter() - self.start, 1)
        write_result(self.out / "gpu_check.json", self.summary)


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _child_env(extra: dict[str, str] | None) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **(extra or {})}


def _pytest_outcomes(log: Path) -> dict[str, Any]:
    """Per-test outcomes, counts and skip reasons from a ``pytest -v -ra`` log (complete or cut by a timeout)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    tests = dict(re.findall(r"^(tests/\S+?::.+?) (PASSED|FAILED|SKIPPED|ERROR)\b", text, re.M))
    counts: dict[str, int] = {}
    for outcome in tests.values():
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    reasons = sorted(set(re.findall(r"^SKIPPED \[\d+\] \S+: (.*)$", text, re.M)))
    failures = re.findall(r"^(?:FAILED|ERROR) (tests/\S+.*)$", text, re.M)
    return {"counts": counts, "tests": tests, "skip_reasons": reasons, "failures": failures}


def _throughput_plan(sizes: dict[str, Any], root: str, compile_rows: bool) -> dict[str, Any]:
    """The rows of one throughput step, in the order they are measured (most wanted first)."""
    setting = {
        "accelerator": sizes["accelerator"],
        "root": root,
        "per_class": sizes["train_per_class"],
        "batches": sizes["batches"],
        "gpu_augmentation": True,
        "ceiling": True,
    }
    cifar = {"synthetic": None, "image_size": 32, "classes": 10, "train_workers": sizes["train_workers"]}
    variants = COMPILE_VARIANTS if compile_rows else EAGER_VARIANTS
    rows = [
        {**cifar, "variant": variant, "method": method, "backbone": backbone, "batch_size": batch,
         "precision": sizes["precision"] or precision, "channels_last": channels_last, "compile": compiled}
        for variant, precision, channels_last, compiled in variants
        for method, backbone in sizes["cifar_models"]
        for batch in sizes["batch_sizes"]
    ]  # fmt: skip
    if not compile_rows:
        net = sizes["imagenet"]
        rows.append(
            {"synthetic": net["images"], "image_size": net["image_size"], "classes": net["classes"], "train_workers": 0,
             "variant": "bf16 (the ImageNet configs' precision)", "method": "finetune", "backbone": net["backbone"],
             "batch_size": net["batch_size"], "precision": sizes["precision"] or "bf16-mixed", "channels_last": False,
             "compile": False}
        )  # fmt: skip
    return {"setting": setting, "rows": rows}


def _read_rows(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"rows": [], "complete": False}


def _loader(check: Check, archive: Path, scratch: Path, sizes: dict[str, Any]) -> None:
    """benchmarks/loader.py on the archive's first training images, decoding on the GPU besides the CPU paths."""
    source = scratch / "loader_source"
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar if m.isfile() and m.name.startswith("train/")][: sizes["loader"]["count"]]
        tar.extractall(source, members=members, filter="data")
    result_file = scratch / "loader_result.json"
    loader = sizes["loader"]
    command = _python(str(HERE / "loader.py"), "--source", str(source), "--count", str(loader["count"]), "--repeats",
                      str(loader["repeats"]), "--batch-size", str(loader["batch_size"]), "--device",
                      loader["device"], "--out", str(result_file))  # fmt: skip
    if importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None:
        command.append("--dali")  # DALI is an extra: measured where the machine has it
    outcome = check.run("loader", command)
    result = json.loads(result_file.read_text()) if result_file.is_file() else None
    check.record("loader", outcome, result)


def _accuracy(check: Check, sizes: dict[str, Any], root: str, epochs: int) -> None:
    import yaml
    from harness import fit_command

    protocol = yaml.safe_load((REPO / "configs" / "icarl_cifar10.yaml").read_text())
    runs = Path(tempfile.mkdtemp(prefix="gpu_check_accuracy_"))
    overrides = [
        "--data.root", root,
        "--data.num_workers", str(sizes["accuracy_workers"]),
        "--model.init_args.schedule.epochs", str(epochs),
        "--trainer.default_root_dir", str(runs),
        "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.enable_progress_bar", "false",
        *sizes["accuracy_overrides"],
    ]  # fmt: skip
    command = fit_command("icarl_cifar10.yaml") + overrides
    outcome = check.run("accuracy", command)
    found = sorted(runs.glob("icarl_cifar10/version_*/metrics.json"))
    result: dict[str, Any] = {
        "config": "configs/icarl_cifar10.yaml",
        "overrides": [o if o not in (root, str(runs)) else "<scratch>" for o in overrides],
        "epochs_per_task": epochs,
        "protocol_epochs_per_task": protocol["model"]["init_args"]["schedule"]["epochs"],
        "published": PUBLISHED,
        "tasks_completed": 0,
    }
    if found:
        metrics = json.loads(found[-1].read_text())
        summary = metrics["summary"]
        result.update(
            primary_scorer=metrics["primary_scorer"],
            tasks_completed=len(metrics["tasks"]),
            accuracy_seen_per_task=[t[f"{metrics['primary_scorer']}_accuracy_seen"] for t in metrics["tasks"]],
            train_seconds_per_task=[t["train_seconds"] for t in metrics["tasks"]],
            last_accuracy=round(summary["last_accuracy"], 2),  # in % already
            avg_incremental_accuracy=round(summary["avg_incremental_accuracy"], 2),
        )
        result["difference_to_published"] = round(result["last_accuracy"] - PUBLISHED["last_accuracy"], 2)
        shutil.copyfile(found[-1], check.out / "accuracy_metrics.json")
    if result["tasks_completed"] < 5 and outcome["status"] == "passed":
        outcome["status"] = "failed"  # the CLI ended without evaluating every task
    check.record("accuracy", outcome, result)
    shutil.rmtree(runs, ignore_errors=True)  # checkpoints: large, and not wanted back


def main_check(args: argparse.Namespace) -> int:
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: the GPU check needs one; --dry-run runs every step on the CPU")
    archive = Path(args.data or DATA / ARCHIVE)
    if not archive.exists():
        raise SystemExit(
            f"--data {archive}: no such file; run `python benchmarks/gpu_check.py --prepare` (copies the CIFAR-10 "
            f"archive into .gpu_data/), or give the archive or a CIFAR-10 folder (train/ + test/, or "
            f"cifar-10-batches-py/)"
        )
    sizes = _sizes(args.dry_run)
    out = Path(args.out)
    total = args.total_budget or TOTAL_BUDGET * sizes["budget_scale"]
    check = Check(out, args.dry_run, total, sizes["budget_scale"])
    steps = args.steps or list(BUDGETS)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_data_"))

    if archive.is_file():  # decoded once here, read by every later step (whichever steps were asked for)
        info = scratch / "data.json"
        command = _python(__file__, "--child", "data", "--archive", str(archive), "--dest", str(scratch))
        for split in ("train", "test"):
            value = sizes[f"{split}_per_class"]
            command += [f"--{split}-per-class", str(value)] if value else []
        outcome = check.run("data", command)
        result = json.loads(info.read_text()) if info.is_file() else None
        if result:
            result["root"] = "<scratch>/cifar-10-batches-py"
        check.record("data", outcome, result)
        if outcome["status"] != "passed":
            print("no data: the CIFAR steps cannot run", flush=True)
        root = str(scratch)
    else:
        root = str(archive)

    if "gpu_tests" in steps:
        junit = check.logs / "gpu_tests.xml"
        command = _python("-m", "pytest", "-m", "gpu", "tests/methods/test_gpu.py", "-v", "-ra",
                          "-p", "no:cacheprovider", f"--junitxml={junit}")  # fmt: skip
        outcome = check.run("gpu_tests", command)
        check.record("gpu_tests", outcome, {"command": "pytest -m gpu tests/methods/test_gpu.py -v -ra",
                                            **_pytest_outcomes(out / outcome.get("log", "-"))})  # fmt: skip

    # the dry run turns torch.compile into a no-op: compiling takes minutes on a CPU
    env = {"TORCH_COMPILE_DISABLE": "1"} if args.dry_run else {}
    for name, compile_rows in (("throughput", False), ("throughput_compile", True)):
        if name not in steps:
            continue
        plan_file, rows_file = scratch / f"{name}_plan.json", out / f"{name}_rows.json"
        plan_file.write_text(json.dumps(_throughput_plan(sizes, root, compile_rows)))
        command = _python(__file__, "--child", "throughput", "--plan", str(plan_file), "--rows", str(rows_file))
        outcome = check.run(name, command, env=env)
        rows = _read_rows(rows_file)
        rows_file.unlink(missing_ok=True)
        planned = len(json.loads(plan_file.read_text())["rows"])
        if outcome["status"] == "passed" and any("error" in row for row in rows["rows"]):
            outcome["status"] = "failed"
        outcome["rows_measured"] = f"{len(rows['rows'])} of {planned}"
        check.record(name, outcome, {"setting": {**rows.get("setting", {}), "root": "<scratch>"},
                                     "compile_disabled": bool(env), "rows": rows["rows"]})  # fmt: skip

    if "loader" in steps and archive.is_file():
        _loader(check, archive, scratch, sizes)

    if "accuracy" in steps:
        _accuracy(check, sizes, root, args.accuracy_epochs or sizes["accuracy_epochs"])

    shutil.rmtree(scratch, ignore_errors=True)
    statuses = {name: step["status"] for name, step in check.summary["steps"].items()}
    print(json.dumps({"total_seconds": check.summary["total_seconds"], "steps": statuses}, indent=1), flush=True)
    return 0 if all(status == "passed" for status in statuses.values()) else 1


def main() -> None:
    sys.path[:0] = [str(HERE), str(REPO)]  # harness and throughput; this checkout's lightning_cil
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for the JSON results and logs")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny sizes")
    parser.add_argument("--data", help=f"CIFAR-10: the JPEG archive (default .gpu_data/{ARCHIVE}) or a folder")
    parser.add_argument("--steps", nargs="+", choices=list(BUDGETS), help="run only these steps (default: all)")
    parser.add_argument("--accuracy-epochs", type=int, help="epochs per task of the accuracy step (GPU default 5)")
    parser.add_argument("--total-budget", type=float, help=f"seconds for all steps (GPU default {TOTAL_BUDGET})")
    parser.add_argument("--prepare", action="store_true", help="copy the CIFAR-10 archive and download the wheels")
    parser.add_argument("--cifar10", default=str(SHARED_ARCHIVE), help="with --prepare: the CIFAR-10 JPEG archive")
    parser.add_argument("--child", choices=["data", "throughput"], help=argparse.SUPPRESS)
    for hidden in ("--archive", "--dest", "--plan", "--rows"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    for hidden in ("--train-per-class", "--test-per-class"):
        parser.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "data":
        info = cifar_pickles(Path(args.archive), Path(args.dest), args.train_per_class, args.test_per_class)
        (Path(args.dest) / "data.json").write_text(json.dumps(info))
        return
    if args.child == "throughput":
        return throughput_rows(json.loads(Path(args.plan).read_text()), Path(args.rows))
    if args.prepare:
        return prepare(Path(args.cifar10))
    if args.out is None:
        parser.error("give --out DIR (the folder for the results), or --prepare")
    if args.accuracy_epochs is not None and args.accuracy_epochs < 1:
        parser.error(f"--accuracy-epochs {args.accuracy_epochs}: give at least 1")
    sys.exit(main_check(args))


if __name__ == "__main__":
    main()
