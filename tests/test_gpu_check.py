"""benchmarks/gpu_check.py waits for a GPU machine: its dry run on the CPU runs every step, so the script cannot rot."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, SHARED_DATA

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402  (benchmarks/ is not a package)

ARCHIVE = SHARED_DATA / "cifar10" / "cifar10-jpg.tar.gz"
MACHINE_KEYS = {"device", "gpu_count", "cuda", "driver", "torch", "lightning", "cpu_count", "date"}


def _check(*args, timeout=1500):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


@pytest.mark.slow  # 1-2 min on 2 cores: run it with `pytest -m slow` before a GPU session
def test_dry_run_runs_every_step_and_records_the_machine_in_every_result(tmp_path):
    if not ARCHIVE.is_file():
        pytest.skip(f"the dry run reads {ARCHIVE.name} from the shared data folder; it is absent here")
    done = _check("--dry-run", "--data", str(ARCHIVE), "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["dry_run"] and list(summary["steps"]) == list(gpu_check.BUDGETS)
    for name, step in summary["steps"].items():
        assert step["status"] == "passed" and step["seconds"] <= step["budget_s"], name
        result = json.loads((tmp_path / step["result_file"]).read_text())
        assert MACHINE_KEYS <= set(result["machine"]), name
    steps = {name: step["result"] for name, step in summary["steps"].items()}
    assert steps["data"]["train_images"] == 400 and len(steps["data"]["classes"]) == 10

    # the GPU tests are collected and skip, with the reason, where there is no CUDA
    tests = steps["gpu_tests"]
    assert tests["counts"] == {"skipped": len(tests["tests"])} and len(tests["tests"]) >= 12
    assert any("needs a CUDA GPU" in reason for reason in tests["skip_reasons"])

    rows = steps["throughput"]["rows"] + steps["throughput_compile"]["rows"]
    assert len(rows) == 7 and all(row["images_per_s"] > 0 and row["ceiling_images_per_s"] > 0 for row in rows)
    assert {row["variant"] for row in rows} == {
        "fp32 eager", "bf16", "bf16 + channels-last + compile", "bf16 (the ImageNet configs' precision)"
    }  # fmt: skip
    assert steps["throughput_compile"]["compile_disabled"]

    loader = steps["loader"]["images_per_second_per_core"]
    assert loader["stream_train_loader_decode_on_cpu"] > 0
    mismatches = steps["loader"]["pixel_mismatches"]  # per decoding library, against PIL
    assert steps["loader"]["codec"] in mismatches and set(mismatches.values()) == {0}, mismatches
    accuracy = steps["accuracy"]
    assert accuracy["tasks_completed"] == 5 and len(accuracy["accuracy_seen_per_task"]) == 5
    assert accuracy["epochs_per_task"] == 1 and accuracy["protocol_epochs_per_task"] == 50
    assert accuracy["difference_to_published"] == round(accuracy["last_accuracy"] - 49.02, 2)


def test_a_step_over_its_budget_is_recorded_as_timed_out_and_the_next_one_runs(tmp_path):
    check = gpu_check.Check(tmp_path, dry_run=True, total_budget=60, scale=6 / gpu_check.BUDGETS["data"])
    slow = check.run("data", [sys.executable, "-c", "import time; time.sleep(120)"])
    assert slow["status"] == "timed out" and slow["returncode"] is None and slow["seconds"] < 30
    check.record("data", slow)
    fast = check.run("gpu_tests", [sys.executable, "-c", "print('ran')"])
    assert fast["status"] == "passed" and (tmp_path / fast["log"]).read_text() == "ran\n"
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"]["data"]["status"] == "timed out"


def test_a_missing_data_path_is_refused_before_anything_runs(tmp_path):
    done = _check("--dry-run", "--data", str(tmp_path / "nowhere.tar.gz"), "--out", str(tmp_path / "out"), timeout=300)
    assert done.returncode == 1 and "nowhere.tar.gz: no such file" in done.stderr
    assert "--prepare" in done.stderr and not (tmp_path / "out").exists()


def test_the_cli_parses_a_config_without_wandb_installed():
    """The GPU machine has no wandb: only a configured WandbLogger may need it."""
    code = (
        "import sys; sys.modules['wandb'] = None\n"  # `import wandb` now fails, as where it is not installed
        "sys.argv = ['lightning-cil', 'fit', '--config', 'configs/icarl_cifar10.yaml', '--print_config']\n"
        "from lightning_cil.cli import main; main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "class_path: lightning_cil.methods.ICaRL" in done.stdout
