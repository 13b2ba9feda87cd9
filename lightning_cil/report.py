"""``lightning-cil report``: plots and a markdown table that compare finished (or running) streams.

It reads only each run's ``metrics.json``, so it works on runs from any machine and any logger, and on runs
still in progress (the file is rewritten after every task). The summary numbers are the ones the run itself
computed (``AccuracyMatrix.summary``), so the table matches what the run printed.

lightning-cil report runs/finetune/version_0 runs/icarl/version_0 --out reports/cifar100
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_cil.metrics import AccuracyMatrix, forgetting_per_task, read_metrics
from lightning_cil.plots import (
    AccuracyCurve,
    accuracy_curves_figure,
    accuracy_matrix_figure,
    forgetting_figure,
    save_png,
)

__all__ = ["RunResult", "load_run", "main", "write_report"]

REPORT_FILE = "report.md"


@dataclass(frozen=True)
class RunResult:
    """What the report needs from one run's metrics.json.

    Args:
        path: the run folder as given on the command line.
        metrics: the parsed metrics.json.
        matrix: the primary scorer's accuracy matrix.
    """

    path: Path
    metrics: dict[str, Any]
    matrix: AccuracyMatrix

    @property
    def method(self) -> str:
        return str(self.metrics["method"])

    @property
    def summary(self) -> dict[str, float | None]:
        return self.metrics["summary"]

    @property
    def tasks(self) -> list[dict[str, Any]]:
        return self.metrics["tasks"]


def load_run(run_dir: str | Path) -> RunResult:
    """Read ``run_dir/metrics.json`` (``run_dir`` may also be the file itself).

    Raises:
        FileNotFoundError: there is no metrics.json there.
        ValueError: the file is not a lightning_cil metrics.json with at least one finished task.
    """
    metrics = read_metrics(run_dir)
    matrix = AccuracyMatrix.from_json(metrics["scorers"][metrics["primary_scorer"]])
    return RunResult(Path(run_dir), metrics, matrix)


def _labels(runs: Sequence[RunResult]) -> list[str]:
    """The method's name, plus the run's last two folder names where several runs share a method."""
    counts = Counter(run.method for run in runs)
    labels = [
        run.method if counts[run.method] == 1 else f"{run.method} ({'/'.join(run.path.parts[-2:])})" for run in runs
    ]
    repeated = Counter(labels)
    return [label if repeated[label] == 1 else f"{label} #{i + 1}" for i, label in enumerate(labels)]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "run"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _table(runs: Sequence[RunResult], labels: Sequence[str]) -> list[str]:
    rows = [
        "| run | method | stream | avg. incremental acc. (%) | last acc. (%) | forgetting (%) | parameters "
        "| train time (s) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run, label in zip(runs, labels):
        stream = run.metrics.get("stream", {})
        done, total = len(run.tasks), run.matrix.num_tasks
        progress = (f"{done}" if done == total else f"{done}/{total}") + (" task" if total == 1 else " tasks")
        cells = [
            str(run.path),
            label,
            f"{stream.get('dataset', '?')}, {progress}",
            _percent(run.summary.get("avg_incremental_accuracy")),
            _percent(run.summary.get("last_accuracy")),
            _percent(run.summary.get("average_forgetting")),
            f"{run.tasks[-1]['num_parameters']:,}",
            f"{sum(task['train_seconds'] for task in run.tasks):.1f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write the comparison of ``run_dirs`` into ``out_dir``: PNG figures and ``report.md``; return its path.

    Args:
        run_dirs: run folders (each holding a metrics.json), in the order of the table and legends.
        out_dir: where the files go (created if needed; files of an earlier report are overwritten).
    """
    runs = [load_run(path) for path in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = _labels(runs)
    curves = [
        AccuracyCurve(label, [t["classes_seen"] for t in run.tasks], list(100 * run.matrix.seen[: len(run.tasks)]))
        for run, label in zip(runs, labels)
    ]
    save_png(accuracy_curves_figure(curves), out / "accuracy_seen.png")
    forgetting = [
        (label, list(100 * forgetting_per_task(run.matrix.matrix, len(run.tasks) - 1)))
        for run, label in zip(runs, labels)
    ]
    save_png(forgetting_figure(forgetting), out / "forgetting.png")
    lines = ["# Stream report", "", *_table(runs, labels), ""]
    lines += [
        "Accuracies are those of each run's primary scorer after its last finished task; forgetting is the average "
        "drop of the old tasks from their best accuracy; train time sums the `fit` wall time of every task.",
        "",
        "![accuracy on all seen classes](accuracy_seen.png)",
        "",
        "![forgetting per task](forgetting.png)",
        "",
    ]
    for index, (run, label) in enumerate(zip(runs, labels), start=1):
        name = f"accuracy_matrix_{index}_{_slug(label)}.png"
        title = f"{label}\naccuracy matrix (%), {run.metrics['primary_scorer']} scorer"
        save_png(accuracy_matrix_figure(run.matrix, title), out / name)
        lines += [f"## {label}", "", f"`{run.path}`", "", f"![accuracy matrix of {label}]({name})", ""]
    report = out / REPORT_FILE
    report.write_text("\n".join(lines))
    return report


def main(argv: Sequence[str]) -> None:
    """``lightning-cil report RUN_DIR [RUN_DIR ...] --out DIR``: write the report and print its table."""
    parser = argparse.ArgumentParser(
        prog="lightning-cil report",
        description="Compare runs: accuracy curves, accuracy matrices, forgetting (PNG) and a markdown table.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run folder holding metrics.json")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for report.md and the PNG files")
    args = parser.parse_args(list(argv))
    report = write_report(args.run_dirs, args.out)
    table = [line for line in report.read_text().splitlines() if line.startswith("|")]
    print("\n".join(table))
    print(f"report written to {report}")
