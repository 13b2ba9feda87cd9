"""How a labelled dataset becomes a stream of tasks: protocol presets, class orders, task splits.

Everything here is plain bookkeeping over integer labels, checked eagerly so that a bad stream
definition fails with a readable message before any image is decoded or any epoch runs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

__all__ = [
    "PROTOCOLS",
    "Scenario",
    "TaskInfo",
    "parse_protocol",
    "resolve_class_order",
    "split_classes",
]

Scenario = Literal["class", "task", "domain"]

#: Named protocols of the CIL literature: ``B<initial>_Inc<increment>``; B0 means the first task has
#: ``increment`` classes too. Any name of that shape parses; these are the ones papers report.
PROTOCOLS: dict[str, str] = {
    "B0_Inc2": "CIFAR-100 in 50 tasks of 2 (iCaRL); Split CIFAR-10 in 5 tasks of 2 (DER++)",
    "B0_Inc5": "CIFAR-100 in 20 tasks of 5 (iCaRL, DER)",
    "B0_Inc10": "CIFAR-100 / ImageNet-100 in 10 tasks of 10 (iCaRL, DER, PyCIL)",
    "B0_Inc20": "CIFAR-100 in 5 tasks of 20 (iCaRL, DER)",
    "B0_Inc50": "CIFAR-100 in 2 tasks of 50 (iCaRL)",
    "B0_Inc100": "ImageNet-1000 in 10 tasks of 100 (DER)",
    "B50_Inc5": "CIFAR-100: 50 base classes, then 10 tasks of 5 (PODNet, DER)",
    "B50_Inc10": "CIFAR-100: 50 base classes, then 5 tasks of 10 (PODNet, DER)",
}

_PROTOCOL_RE = re.compile(r"^B(\d+)_Inc(\d+)$")

#: The class-order seed of iCaRL, PyCIL and DER: ``np.random.seed(1993); np.random.permutation``.
DEFAULT_CLASS_ORDER_SEED = 1993


@dataclass(frozen=True)
class TaskInfo:
    """What a method is told about the task that starts or ends.

    Labels are positions in the stream's class order, so ``new_classes`` of a class-incremental
    stream are always ``range(num_seen_classes - len(new_classes), num_seen_classes)``.
    """

    index: int
    num_tasks: int
    new_classes: tuple[int, ...]
    num_seen_classes: int
    num_total_classes: int
    scenario: Scenario = "class"
    #: Task of every label seen so far (label -> task); used to score task-incremental streams.
    label_task: tuple[int, ...] = field(default=())

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_tasks - 1


def parse_protocol(name: str, num_classes: int | None = None) -> tuple[int, int]:
    """``"B50_Inc10"`` -> ``(50, 10)``; ``"B0_Inc10"`` -> ``(10, 10)``."""
    match = _PROTOCOL_RE.match(name)
    if match is None:
        known = ", ".join(PROTOCOLS)
        raise ValueError(f"protocol={name!r} is not of the form 'B<initial>_Inc<increment>' (known: {known}).")
    base, inc = int(match.group(1)), int(match.group(2))
    if inc <= 0:
        raise ValueError(f"protocol={name!r}: the increment must be positive.")
    initial = base if base > 0 else inc
    if num_classes is not None and initial > num_classes:
        raise ValueError(f"protocol={name!r} needs {initial} initial classes but the dataset has {num_classes}.")
    return initial, inc


def split_classes(num_classes: int, initial: int, increment: int | Sequence[int]) -> list[list[int]]:
    """Class positions of each task. The tasks must cover ``num_classes`` exactly."""
    if initial <= 0:
        raise ValueError(f"initial_classes={initial} must be positive.")
    if isinstance(increment, int):
        if increment <= 0:
            raise ValueError(f"increment={increment} must be positive.")
        rest = num_classes - initial
        if rest < 0 or rest % increment:
            tasks = max(rest // increment, 0)
            covered = initial + tasks * increment
            raise ValueError(
                f"initial_classes={initial} and increment={increment} do not cover the {num_classes} classes: "
                f"{initial} + {tasks} x {increment} = {covered}, leaving {num_classes - covered}. "
                f"Choose values with (num_classes - initial_classes) divisible by increment, or give increment "
                f"as a list of task sizes."
            )
        sizes = [initial] + [increment] * (rest // increment)
    else:
        sizes = [initial, *increment]
        if any(s <= 0 for s in sizes):
            raise ValueError(f"task sizes {sizes} must all be positive.")
        if sum(sizes) != num_classes:
            raise ValueError(
                f"task sizes {sizes} (initial_classes + increment list) sum to {sum(sizes)}, "
                f"but the dataset has {num_classes} classes."
            )
    bounds = np.cumsum([0, *sizes])
    return [list(range(int(a), int(b))) for a, b in zip(bounds[:-1], bounds[1:])]


def resolve_class_order(
    class_names: Sequence[str], class_order: Sequence[int | str] | None, seed: int | None
) -> list[int]:
    """The order in which dataset classes (by dataset index) enter the stream.

    An explicit order may name classes by index or by name. Without one, the order is
    ``np.random.RandomState(seed).permutation`` (the literature's convention) or, with ``seed=None``,
    the dataset's own order.
    """
    num_classes = len(class_names)
    if class_order is None:
        if seed is None:
            return list(range(num_classes))
        return [int(c) for c in np.random.RandomState(seed).permutation(num_classes)]
    index_of = {name: i for i, name in enumerate(class_names)}
    order: list[int] = []
    for entry in class_order:
        if isinstance(entry, str) and not entry.lstrip("-").isdigit():
            if entry not in index_of:
                raise ValueError(
                    f"class_order names an unknown class {entry!r}; the dataset's classes are: "
                    f"{', '.join(class_names[:20])}{' ...' if num_classes > 20 else ''}."
                )
            order.append(index_of[entry])
        else:
            idx = int(entry)
            if not 0 <= idx < num_classes:
                raise ValueError(f"class_order contains {idx}, outside the dataset's class ids 0..{num_classes - 1}.")
            order.append(idx)
    seen: set[int] = set()
    duplicates = sorted({c for c in order if c in seen or seen.add(c)})  # type: ignore[func-returns-value]
    if duplicates:
        raise ValueError(f"class_order lists classes more than once: {[class_names[c] for c in duplicates]}.")
    missing = sorted(set(range(num_classes)) - set(order))
    if missing:
        raise ValueError(
            f"class_order has {len(order)} classes but the dataset has {num_classes}; missing: "
            f"{[class_names[c] for c in missing][:20]}."
        )
    return order
