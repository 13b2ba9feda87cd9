"""The accuracy matrix of a stream and the summary numbers the CIL literature reports from it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["AccuracyMatrix", "average_forgetting", "backward_transfer", "forgetting_per_task"]


def forgetting_per_task(matrix: np.ndarray, upto: int) -> np.ndarray:
    """Forgetting of each old task j after task ``upto``: max_{i<upto} R[i, j] - R[upto, j] (one value per j < upto)."""
    return np.array([np.nanmax(matrix[j:upto, j]) - matrix[upto, j] for j in range(upto)], dtype=np.float64)


def average_forgetting(matrix: np.ndarray, upto: int) -> float:
    """Chaudhry et al. (2018): mean over old tasks j of max_{i<upto} R[i, j] - R[upto, j]."""
    if upto == 0:
        return float("nan")
    return float(np.mean(forgetting_per_task(matrix, upto)))


def backward_transfer(matrix: np.ndarray, upto: int) -> float:
    """Lopez-Paz & Ranzato (2017): mean over old tasks j of R[upto, j] - R[j, j]."""
    if upto == 0:
        return float("nan")
    return float(np.mean([matrix[upto, j] - matrix[j, j] for j in range(upto)]))


def _clean(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 6)


@dataclass
class AccuracyMatrix:
    """R[i, j] = top-1 accuracy on task j's test data after training task i (fractions in [0, 1]).

    ``seen[i]`` is the accuracy over all test samples of tasks 0..i after task i: the per-step number
    whose mean is the average incremental accuracy.
    """

    num_tasks: int
    matrix: np.ndarray = field(init=False)
    seen: np.ndarray = field(init=False)
    seen_top5: np.ndarray = field(init=False)
    old: np.ndarray = field(init=False)
    new: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n = self.num_tasks
        self.matrix = np.full((n, n), np.nan)
        self.seen, self.seen_top5, self.old, self.new = (np.full(n, np.nan) for _ in range(4))

    def record(self, task: int, correct, correct_top5, total) -> None:
        """Fill row ``task`` from per-task counts of one evaluation pass."""
        correct, correct_top5, total = (
            np.asarray(x, dtype=np.float64)[: task + 1] for x in (correct, correct_top5, total)
        )
        if (total == 0).any():
            raise ValueError(f"evaluation after task {task} saw no test samples of tasks {np.flatnonzero(total == 0)}.")
        self.matrix[task, : task + 1] = correct / total
        self.seen[task] = correct.sum() / total.sum()
        self.seen_top5[task] = correct_top5.sum() / total.sum()
        self.new[task] = correct[task] / total[task]
        self.old[task] = correct[:task].sum() / total[:task].sum() if task else np.nan

    @property
    def completed(self) -> int:
        """Number of rows filled."""
        return int((~np.isnan(self.seen)).sum())

    def summary(self) -> dict[str, float | None]:
        last = self.completed - 1
        if last < 0:
            return {}
        return {
            "avg_incremental_accuracy": _clean(np.nanmean(self.seen[: last + 1])),
            "last_accuracy": _clean(self.seen[last]),
            "avg_incremental_top5": _clean(np.nanmean(self.seen_top5[: last + 1])),
            "last_top5": _clean(self.seen_top5[last]),
            "average_forgetting": _clean(average_forgetting(self.matrix, last)),
            "backward_transfer": _clean(backward_transfer(self.matrix, last)),
            "last_old_accuracy": _clean(self.old[last]),
            "last_new_accuracy": _clean(self.new[last]),
        }

    def state_dict(self) -> dict:
        return {
            "num_tasks": self.num_tasks,
            "matrix": self.matrix.tolist(),
            "seen": self.seen.tolist(),
            "seen_top5": self.seen_top5.tolist(),
            "old": self.old.tolist(),
            "new": self.new.tolist(),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> AccuracyMatrix:
        out = cls(int(state["num_tasks"]))
        for key in ("matrix", "seen", "seen_top5", "old", "new"):
            setattr(out, key, np.asarray(state[key], dtype=np.float64))
        return out

    @classmethod
    def from_json(cls, payload: dict) -> AccuracyMatrix:
        """Inverse of ``to_json`` (to the 4 decimals it keeps): a scorer's entry of a run's metrics.json."""
        keys = {
            "matrix": "accuracy_matrix",
            "seen": "accuracy_seen",
            "seen_top5": "top5_seen",
            "old": "accuracy_old",
            "new": "accuracy_new",
        }
        out = cls(len(payload["accuracy_matrix"]))
        for attr, key in keys.items():
            setattr(out, attr, np.array(payload[key], dtype=np.float64) / 100)  # None becomes nan
        return out

    def to_json(self) -> dict:
        """JSON-friendly form (percentages, None for cells not yet measured)."""

        def pct(values):
            return [None if math.isnan(v) else round(100 * v, 4) for v in values]

        return {
            "accuracy_matrix": [pct(row) for row in self.matrix],
            "accuracy_seen": pct(self.seen),
            "top5_seen": pct(self.seen_top5),
            "accuracy_old": pct(self.old),
            "accuracy_new": pct(self.new),
            "summary": {k: (None if v is None else round(100 * v, 4)) for k, v in self.summary().items()},
        }

    def format_table(self, title: str = "") -> str:
        """The matrix as text, rows = after task i, columns = accuracy on task j, in percent."""
        n = self.completed
        head = "after \\ on " + "".join(f"{f'T{j}':>8}" for j in range(n)) + f"{'seen':>9}"
        lines = [title, head] if title else [head]
        for i in range(n):
            cells = "".join(f"{100 * self.matrix[i, j]:8.2f}" if j <= i else f"{'':>8}" for j in range(n))
            lines.append(f"{f'T{i}':<11}" + cells + f"{100 * self.seen[i]:9.2f}")
        summary = self.summary()
        if summary:
            lines.append(
                f"average incremental accuracy: {100 * summary['avg_incremental_accuracy']:.2f}%  "
                f"last: {100 * summary['last_accuracy']:.2f}%"
                + (
                    f"  forgetting: {100 * summary['average_forgetting']:.2f}%"
                    if summary["average_forgetting"] is not None
                    else ""
                )
            )
        return "\n".join(lines)
