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
    "StreamLayout",
    "TaskInfo",
    "build_layout",
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
    def num_old_classes(self) -> int:
        """Seen labels that this task does not bring: in a class-incremental stream the labels of earlier tasks,
        ``new_classes`` starting right after them; 0 in a domain-incremental one (every task brings every label)."""
        return self.num_seen_classes - len(self.new_classes)

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


@dataclass(frozen=True)
class StreamLayout:
    """The shape of a stream, fixed once the dataset's classes and the data settings are known.

    Labels are positions in ``class_order``; in a task-incremental stream of domains each domain has its own
    labels, ``domain * domain_offset + class``. Everything a task needs (its :class:`TaskInfo`, the label <-> task
    maps) is computed here once, not at every lookup.

    Args:
        scenario: ``class``, ``task`` or ``domain``.
        class_order: the dataset class of every label position.
        task_classes: the labels of every task.
        domain_offset: labels per domain in a task stream of domains (0 otherwise).
    """

    scenario: Scenario
    class_order: tuple[int, ...]
    task_classes: tuple[tuple[int, ...], ...]
    domain_offset: int = 0
    #: the label of every dataset class (inverse of ``class_order``)
    label_of_target: tuple[int, ...] = field(init=False)
    #: the task of every label (in a domain-incremental stream, where every task has every label: the last)
    task_of_label: tuple[int, ...] = field(init=False)
    infos: tuple[TaskInfo, ...] = field(init=False)

    def __post_init__(self) -> None:
        label_of_target = [0] * len(self.class_order)
        for label, target in enumerate(self.class_order):
            label_of_target[target] = label
        task_of_label = [0] * self.num_classes
        infos = []
        for task, classes in enumerate(self.task_classes):
            for label in classes:
                task_of_label[label] = task
            num_seen = max(max(c) for c in self.task_classes[: task + 1]) + 1
            infos.append(
                TaskInfo(
                    index=task,
                    num_tasks=self.num_tasks,
                    new_classes=tuple(classes),
                    num_seen_classes=num_seen,
                    num_total_classes=self.num_classes,
                    scenario=self.scenario,
                    label_task=tuple(task_of_label[:num_seen]),
                )
            )
        object.__setattr__(self, "label_of_target", tuple(label_of_target))
        object.__setattr__(self, "task_of_label", tuple(task_of_label))
        object.__setattr__(self, "infos", tuple(infos))

    @property
    def num_tasks(self) -> int:
        return len(self.task_classes)

    @property
    def num_classes(self) -> int:
        """Size of the label space over the whole stream."""
        return max(max(c) for c in self.task_classes) + 1

    @property
    def by_domain(self) -> bool:
        """One task per domain: a sample's task is its domain, not its label's task."""
        return self.scenario == "domain" or self.domain_offset > 0

    def task_info(self, task: int) -> TaskInfo:
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} is outside this stream's tasks 0..{self.num_tasks - 1}.")
        return self.infos[task]


def build_layout(
    scenario: Scenario,
    class_names: Sequence[str],
    num_domains: int = 1,
    protocol: str | None = None,
    initial_classes: int | None = None,
    increment: int | list[int] | None = None,
    class_order: Sequence[int | str] | None = None,
    class_order_seed: int | None = DEFAULT_CLASS_ORDER_SEED,
    dataset: str = "the dataset",
) -> StreamLayout:
    """The layout of a stream over a dataset with ``class_names`` (and ``num_domains`` domains).

    Raises ValueError on any bad combination of settings, naming it (``dataset``: the dataset's name there). A
    task-incremental stream of several domains and a domain-incremental stream have one task per domain and keep
    the dataset's class order.
    """
    num_classes = len(class_names)
    by_domain = scenario == "domain" or (scenario == "task" and num_domains > 1)
    if by_domain:
        if num_domains < 2:
            raise ValueError(
                f"scenario={scenario!r} with one task per domain needs a dataset with several domains "
                f"(dataset='domains'); {dataset!r} has one."
            )
        if protocol is not None or initial_classes is not None or increment is not None:
            raise ValueError(
                "protocol/initial_classes/increment cut classes into tasks; a stream of domains has one task "
                "per domain (choose the domains and their order with data.domains)."
            )
        offset = num_classes if scenario == "task" else 0
        tasks = [tuple(d * offset + c for c in range(num_classes)) for d in range(num_domains)]
        return StreamLayout(scenario, tuple(range(num_classes)), tuple(tasks), offset)
    order = resolve_class_order(class_names, class_order, class_order_seed)
    if protocol is not None:
        initial, step = parse_protocol(protocol, num_classes)
    elif initial_classes is None and increment is None:
        raise ValueError("set data.protocol (e.g. B0_Inc10) or data.initial_classes and data.increment.")
    else:
        step = increment if increment is not None else initial_classes
        initial = initial_classes if initial_classes is not None else step
        if isinstance(initial, list):
            raise ValueError("initial_classes must be one number.")
    tasks = split_classes(num_classes, int(initial), step)
    return StreamLayout(scenario, tuple(order), tuple(tuple(c) for c in tasks))
