"""Figures of stream results, shared by the ``report`` command and the W&B dashboard.

Figures are built on matplotlib's Agg canvas directly, not through pyplot: no display is needed, no global
figure registry grows during a long stream, and importing this module does not touch the user's backend.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from lightning_cil.metrics import AccuracyMatrix

__all__ = [
    "AccuracyCurve",
    "accuracy_curves_figure",
    "accuracy_matrix_figure",
    "forgetting_figure",
    "save_png",
    "to_image",
]

#: above this many tasks, cells are too small to print their values in
_ANNOTATE_UP_TO = 20


@dataclass(frozen=True)
class AccuracyCurve:
    """One run's line in the accuracy-vs-classes figure.

    Args:
        label: legend entry.
        classes_seen: number of classes learnt after each task (the x values).
        accuracy: accuracy on all seen classes after each task, in percent.
    """

    label: str
    classes_seen: Sequence[int]
    accuracy: Sequence[float]


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _task_ticks(n: int, most: int) -> list[int]:
    """Every task's index, or every k-th one so that at most ``most`` labels share an axis."""
    return list(range(0, n, math.ceil(n / most)))


def accuracy_curves_figure(curves: Sequence[AccuracyCurve]) -> Figure:
    """Accuracy on all seen classes against the number of classes, one line per run (as in the iCaRL and DER
    papers); the legend gives each run's average incremental accuracy."""
    figure = _figure(6.4, 4.4)
    ax = figure.add_subplot()
    for curve in curves:
        average = float(np.mean(curve.accuracy))
        ax.plot(curve.classes_seen, curve.accuracy, marker="o", markersize=4, label=f"{curve.label} [{average:.2f}]")
    ticks = sorted({int(c) for curve in curves for c in curve.classes_seen})
    if len(ticks) <= 12:
        ax.set_xticks(ticks)
    ax.set_ylim(0, 102)
    ax.set_xlabel("number of classes")
    ax.set_ylabel("accuracy on all seen classes (%)")
    ax.set_title("Accuracy on seen classes [average incremental accuracy]")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    return figure


def accuracy_matrix_figure(matrix: AccuracyMatrix, title: str, tasks: int | None = None) -> Figure:
    """Heatmap of R[i, j] (accuracy on task j after training task i, %).

    Args:
        matrix: the accuracy matrix.
        title: the figure's title.
        tasks: how many tasks to draw (default: those completed); the whole stream keeps one frame size while
            the matrix fills up, e.g. in W&B's media slider.
    """
    n = max(tasks or matrix.completed, 1)
    values = 100 * matrix.matrix[:n, :n]
    side = min(3.0 + 0.6 * n, 9.0)
    figure = _figure(side + 1.0, side)
    ax = figure.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=100)
    figure.colorbar(image, ax=ax, label="accuracy (%)", shrink=0.85)
    if n <= _ANNOTATE_UP_TO:
        for (i, j), value in np.ndenumerate(values):
            if not np.isnan(value):
                color = "black" if value > 60 else "white"
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", color=color, fontsize="small")
    ticks = _task_ticks(n, most=_ANNOTATE_UP_TO)
    ax.set_xticks(ticks, [f"T{t}" for t in ticks])
    ax.set_yticks(ticks, [f"T{t}" for t in ticks])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_title(title, fontsize="medium")
    ax.spines[:].set_visible(False)
    return figure


def forgetting_figure(runs: Sequence[tuple[str, Sequence[float]]]) -> Figure:
    """Grouped bars: how much of each old task's best accuracy a run lost by its end, in percentage points.

    Args:
        runs: (label, forgetting of task 0, 1, ... in percentage points) per run.
    """
    figure = _figure(6.4, 4.0)
    ax = figure.add_subplot()
    longest = max((len(values) for _, values in runs), default=0)
    if longest == 0:
        ax.text(0.5, 0.5, "no old tasks: every run has a single task", ha="center", va="center")
        ax.set_axis_off()
        return figure
    width = 0.8 / len(runs)
    for k, (label, values) in enumerate(runs):
        positions = np.arange(len(values)) - 0.4 + width * (k + 0.5)
        ax.bar(positions, values, width=width, label=label)
    ticks = _task_ticks(longest, most=12)
    ax.set_xticks(ticks, [f"T{t}" for t in ticks])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("task")
    ax.set_ylabel("forgetting (percentage points)")
    ax.set_title("Forgetting per task at the end of the stream")
    ax.grid(axis="y", alpha=0.3)
    figure.legend(loc="outside lower center", ncols=min(len(runs), 3), fontsize="small", frameon=False)
    return figure


def save_png(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG file and return its path."""
    path = Path(path)
    figure.savefig(path, format="png", dpi=120)
    return path


def to_image(figure: Figure) -> Image.Image:
    """The figure rendered as a PIL image (what ``wandb.Image`` takes without writing a file)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    buffer.seek(0)
    return Image.open(buffer)
