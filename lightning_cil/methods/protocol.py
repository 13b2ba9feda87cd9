"""A method's protocol card: what the protocol of its paper requires, so that a run says which one it ran.

Frameworks that reimplement the pre-trained-model methods have run prompt methods with a rehearsal memory, or
without the paper's old-logit masking, and compared the numbers with the papers'. Each method declares its card
(``IncrementalModule.protocol``); the stream checks the run against it before training (:func:`check_protocol`) and
``metrics.json`` records it, with the weights actually used next to the ones the paper's numbers were measured on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_cil.methods.base import IncrementalModule

__all__ = ["Protocol", "check_protocol", "protocol_record"]


@dataclass(frozen=True)
class Protocol:
    """What a method's protocol requires.

    Args:
        rehearsal_free: the method keeps no exemplars of old classes (a run that adds a memory is refused).
        old_logit_masking: training masks the logits of classes outside the current task (L2P, DualPrompt, CODA).
        task_id_free: inference needs no task id.
        paper_weights: the backbone weights the paper's numbers were measured with (timm tags), if any.
    """

    rehearsal_free: bool = False
    old_logit_masking: bool = False
    task_id_free: bool = True
    paper_weights: tuple[str, ...] = ()


def check_protocol(model: IncrementalModule) -> None:
    """Refuse, before training, a run that breaks ``model``'s protocol (one line naming what breaks it)."""
    card = model.protocol()
    name = type(model).__name__
    if card.rehearsal_free and (model.exemplar_indices() is not None or model.memory_size() is not None):
        raise ValueError(
            f"{name} is rehearsal-free (its paper's protocol keeps no exemplars), but this model keeps a memory of "
            f"old samples: remove the memory (memory_budget/memory_per_class) or use a rehearsal method."
        )
    if card.rehearsal_free and model.trains_on_all_seen_tasks:
        raise ValueError(f"{name} is rehearsal-free, but this model trains on every seen task's data.")


def protocol_record(model: IncrementalModule) -> dict[str, Any]:
    """The card as ``metrics.json`` records it, with the weights this run used."""
    card = model.protocol()
    backbone, pretrained = model.hparams.get("backbone"), model.hparams.get("pretrained")
    used = f"{backbone} ({'hub' if pretrained == 'hub' else pretrained or 'random initialisation'})"
    paper = card.paper_weights
    return {
        **asdict(card),
        "weights": used,
        "paper_weights_used": pretrained == "hub" and any(str(backbone).endswith(tag) for tag in paper),
    }
