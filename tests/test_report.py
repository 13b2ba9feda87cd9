"""`lightning-cil report`: PNG figures and a markdown table whose numbers are those of each run's metrics.json."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli
from PIL import Image

from lightning_cil.cli import main
from lightning_cil.metrics import AccuracyMatrix
from lightning_cil.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list[Path]:
    """The quickstart with 1 epoch per task, once with Finetune and once with Joint."""
    runs = []
    for method in ("Finetune", "Joint"):
        root = tmp_path_factory.mktemp(method.lower())
        out = cli(
            "fit",
            "--config",
            str(REPO / "configs" / "quickstart.yaml"),
            "--model.class_path",
            f"lightning_cil.methods.{method}",
            "--model.init_args.schedule",
            "{epochs: 1, lr: 0.02, milestones: []}",
            "--trainer.default_root_dir",
            str(root),
            "--trainer.logger.init_args.save_dir",
            str(root),
            "--trainer.enable_progress_bar",
            "false",
        )
        assert out.returncode == 0, out.stderr[-3000:]
        (metrics,) = root.glob("quickstart/version_*/metrics.json")
        runs.append(metrics.parent)
    return runs


def _table(markdown: str) -> list[list[str]]:
    """Data rows of the markdown table, as cells."""
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[2:]]  # after the header and the alignment row


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()
        assert min(image.size) >= 300, (path, image.size)


def test_report_writes_figures_and_a_table_that_matches_metrics_json(two_runs, tmp_path):
    out = cli("report", *map(str, two_runs), "--out", str(tmp_path / "report"))
    assert out.returncode == 0, out.stderr[-3000:]
    report = tmp_path / "report" / "report.md"
    assert "report written to" in out.stdout and report.is_file()
    pngs = sorted((tmp_path / "report").glob("*.png"))
    assert [p.name for p in pngs] == [
        "accuracy_matrix_1_finetune.png",
        "accuracy_matrix_2_joint.png",
        "accuracy_seen.png",
        "forgetting.png",
    ]
    for png in pngs:
        _assert_png(png)
        assert f"]({png.name})" in report.read_text()
    rows = _table(report.read_text())
    assert len(rows) == 2
    for row, run in zip(rows, two_runs):
        metrics = json.loads((run / "metrics.json").read_text())
        path, method, stream, average, last, forgetting, parameters, seconds = row
        summary = metrics["summary"]
        assert (path, method, stream) == (str(run), metrics["method"], "digits, 5 tasks")
        assert float(average) == pytest.approx(summary["avg_incremental_accuracy"], abs=0.005)
        assert float(last) == pytest.approx(summary["last_accuracy"], abs=0.005)
        assert float(forgetting) == pytest.approx(summary["average_forgetting"], abs=0.005)
        assert int(parameters.replace(",", "")) == metrics["tasks"][-1]["num_parameters"]
        assert float(seconds) == pytest.approx(sum(t["train_seconds"] for t in metrics["tasks"]), abs=0.05)
    finetune, joint = (json.loads((run / "metrics.json").read_text())["summary"] for run in two_runs)
    assert joint["avg_incremental_accuracy"] > finetune["avg_incremental_accuracy"]  # the plots show a real gap


def _write_metrics(folder: Path, method: str, rows: list[list[float]], num_tasks: int) -> Path:
    """A metrics.json as the stream writes it, for a run that finished ``len(rows)`` of ``num_tasks`` tasks."""
    matrix = AccuracyMatrix(num_tasks)
    for task, row in enumerate(rows):
        matrix.record(task, [100 * r for r in row] + [0] * (num_tasks - len(row)), [100] * num_tasks, [100] * num_tasks)
    payload = {
        "method": method,
        "primary_scorer": "cnn",
        "summary": matrix.to_json()["summary"],
        "scorers": {"cnn": matrix.to_json()},
        "tasks": [
            {"task": t, "classes_seen": 2 * (t + 1), "num_parameters": 1000 + t, "train_seconds": 1.25}
            for t in range(len(rows))
        ],
        "stream": {"dataset": "toy"},
    }
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(payload))
    return folder


def test_runs_in_progress_and_single_task_runs_are_reported(tmp_path):
    running = _write_metrics(tmp_path / "a" / "version_0", "Toy", [[0.9], [0.5, 0.8]], num_tasks=3)
    single = _write_metrics(tmp_path / "b" / "version_0", "Toy", [[0.7]], num_tasks=1)
    report = write_report([running, single], tmp_path / "out")
    rows = _table(report.read_text())
    assert rows[0][1:6] == ["Toy (a/version_0)", "toy, 2/3 tasks", "77.50", "65.00", "40.00"]
    assert rows[1][1:6] == ["Toy (b/version_0)", "toy, 1 task", "70.00", "70.00", "n/a"]
    for png in (tmp_path / "out").glob("*.png"):
        _assert_png(png)


def _bad_json(folder: Path) -> Path:
    folder.mkdir()
    (folder / "metrics.json").write_text("{not json")
    return folder


def _foreign_json(folder: Path) -> Path:
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"accuracy": 0.5}))
    return folder


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "missing", r"run folder '.*missing' does not exist"),
        (lambda tmp: tmp, r"'.*' has no metrics\.json: give the folder of a run"),
        (lambda tmp: _bad_json(tmp / "bad"), r"bad/metrics\.json is not valid JSON"),
        (lambda tmp: _foreign_json(tmp / "other"), r"other/metrics\.json is not a lightning_cil metrics\.json"),
    ],
    ids=["missing", "no-metrics", "bad-json", "foreign-json"],
)
def test_bad_run_folder_is_one_clear_line_and_exit_code_2(tmp_path, capsys, make, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(make(tmp_path)), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lightning-cil: error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def _heavy(modules: list[str]) -> list[str]:
    """Lightning, pytorch_lightning, torch.nn (and so any model code) among ``modules``."""
    return sorted(m for m in modules if m.split(".")[0] in ("lightning", "pytorch_lightning") or "torch.nn" in m)


def test_report_imports_neither_lightning_nor_torch_nn(tmp_path):
    """The offline report reads JSON only: it must start without the training stack (which takes seconds)."""
    run = _write_metrics(tmp_path / "run" / "version_0", "Toy", [[0.9], [0.5, 0.8]], num_tasks=2)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # what `python -m lightning_cil report` imports, as `-X importtime` lists it
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "lightning_cil", "report", str(run), "--out", str(tmp_path / "a")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    imported = [line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert "lightning_cil.report" in imported and _heavy(imported) == []
    # what the `lightning-cil` console script (pyproject's entry point) has in sys.modules after a report
    module, function = re.search(r'^lightning-cil = "(.+):(.+)"', (REPO / "pyproject.toml").read_text(), re.M).groups()
    probe = (
        f"import importlib, json, sys; sys.argv = ['lightning-cil', 'report', {str(run)!r}, '--out', "
        f"{str(tmp_path / 'b')!r}]; getattr(importlib.import_module({module!r}), {function!r})(); "
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    modules = json.loads(out.stdout.splitlines()[-1])
    assert "lightning_cil.report" in modules and _heavy(modules) == []
