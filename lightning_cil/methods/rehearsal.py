"""Rehearsal: an exemplar memory of old classes that joins every later task's training data (iCaRL, BiC, WA, DER)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_cil.data.memory import ExemplarMemory, Selection
from lightning_cil.data.scenario import TaskInfo
from lightning_cil.methods.base import CHECKPOINT_KEY, IncrementalModule, TaskSchedule
from lightning_cil.networks.backbones import BackboneSpec

__all__ = ["RehearsalModule"]


class RehearsalModule(IncrementalModule):
    """A method that keeps an :class:`ExemplarMemory`: the one place of its settings, its update and its state.

    The stream adds :meth:`exemplar_indices` to each fit's training data; :meth:`update_memory` (called from the
    method's ``on_task_end``, after whatever it changes in the network) shrinks the old classes to their new quota
    and selects the new classes' exemplars on the current features. The memory travels in the checkpoint's
    architecture entry. Combine it with other bases before them, e.g. ``class ICaRL(RehearsalModule,
    DistillationModule)``: each method's ``__init__`` passes the memory settings on, so a config keeps the flat
    keys ``memory_budget``, ``memory_per_class`` and ``selection``.

    Args:
        backbone / in_channels / schedule / first_task / pretrained: as for :class:`IncrementalModule`.
        memory_budget: total exemplars (2,000 for CIFAR-100 in iCaRL, PyCIL and DER); None to use memory_per_class.
        memory_per_class: fixed exemplars per class instead of a total.
        selection: ``herding`` (iCaRL), ``random`` or ``closest`` (nearest to the class mean).
    """

    def __init__(
        self,
        backbone: BackboneSpec = "resnet32",
        in_channels: int = 3,
        schedule: TaskSchedule | None = None,
        first_task: TaskSchedule | None = None,
        pretrained: str | None = None,
        memory_budget: int | None = 2000,
        memory_per_class: int | None = None,
        selection: Selection = "herding",
    ) -> None:
        super().__init__(backbone, in_channels, schedule, first_task, pretrained)
        self.memory = ExemplarMemory(memory_budget, memory_per_class, selection)

    def on_task_start(self, task: TaskInfo) -> None:
        """The memory is checked against the stream's classes at the first task's start, before any training."""
        self.memory.check_capacity(task.num_total_classes)
        super().on_task_start(task)

    def exemplar_indices(self) -> Tensor:
        return self.memory.indices()

    def memory_size(self) -> int:
        return len(self.memory)

    def update_memory(self, task: TaskInfo) -> None:
        """Rehearsal step of a task end: shrink old classes to the new quota, then select exemplars for the new
        classes from their training samples, on this module's current features."""
        data = self.task_data
        new = {}
        for label in task.new_classes:
            indices = data.members(label)
            new[label] = (indices, self.sample_features(indices))
        self.memory.update(range(task.num_seen_classes), new)

    def sample_features(self, indices: Tensor) -> Tensor:
        """Features of train-split samples under the test transform, for herding and the methods' task-end
        classifiers. A method whose features are partly frozen (DER) reuses what its frozen parts computed."""
        return self.extract_features(self.task_data.subset(indices))

    def architecture(self) -> dict[str, Any]:
        return {**super().architecture(), "memory": self.memory.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.memory.load_state_dict(checkpoint[CHECKPOINT_KEY]["memory"])
