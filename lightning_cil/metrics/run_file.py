"""A run's ``metrics.json``: its name and its reader (the stream rewrites it after every task).

Plain JSON and NumPy: reading a run needs neither torch nor Lightning, so ``lightning-cil report`` starts fast and
runs where no training stack is installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["METRICS_FILE", "REQUIRED_KEYS", "read_metrics"]

#: the file, in the run folder, where the stream records its accuracy matrices and per-task history
METRICS_FILE = "metrics.json"
#: what every metrics.json holds
REQUIRED_KEYS = ("method", "primary_scorer", "summary", "scorers", "tasks")


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    """The parsed ``run_dir/metrics.json`` (``run_dir`` may also be the file itself).

    Raises:
        FileNotFoundError: there is no metrics.json there.
        ValueError: the file is not a lightning_cil metrics.json with at least one finished task.
    """
    path = Path(run_dir)
    file = path if path.is_file() else path / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist.")
    if not file.is_file():
        raise FileNotFoundError(
            f"{str(run_dir)!r} has no {METRICS_FILE}: give the folder of a run (the one holding checkpoints/, "
            f"e.g. runs/quickstart/version_0); the file appears there after the first task."
        )
    try:
        metrics = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON ({error}).") from None
    missing = [key for key in REQUIRED_KEYS if key not in metrics] if isinstance(metrics, dict) else list(REQUIRED_KEYS)
    if missing:
        raise ValueError(f"{file} is not a lightning_cil {METRICS_FILE} (it lacks {', '.join(missing)}).")
    if not metrics["tasks"]:
        raise ValueError(f"{file} records no finished task yet.")
    return metrics
