"""Every method passes the same checks: it runs a stream, and a checkpoint rebuilds it exactly."""

import inspect

import lightning as L
import pytest
import torch
from conftest import digits_stream, make_trainer

import lightning_cil.methods as methods
from lightning_cil import TaskSchedule, run_stream
from lightning_cil.methods import IncrementalModule
from lightning_cil.methods.masking import TaskMaskedModule
from lightning_cil.methods.prompting import PromptModule
from lightning_cil.methods.prototypes import PrototypeModule
from lightning_cil.methods.slca import SLCA

#: the pre-trained-model methods need a pre-trained ViT: their contract is in test_pretrained_models.py
METHODS = [
    cls
    for _, cls in inspect.getmembers(methods, inspect.isclass)
    if issubclass(cls, IncrementalModule)
    and cls is not IncrementalModule
    and not issubclass(cls, (PrototypeModule, PromptModule, SLCA))
]


def test_registry_lists_the_methods():
    assert {cls.__name__ for cls in METHODS} >= {"Finetune", "Joint", "ICaRL"}


#: methods with options that change their architecture get their own contract case
REQUIRED = {methods.PackNet: {"retrain_epochs": 1}}  # fits the 2-epoch tasks below
CASES = [(cls, REQUIRED.get(cls, {})) for cls in METHODS] + [
    (methods.DER, {"prune": True}),
    (methods.Piggyback, {"task_batchnorm": True}),
]


#: every method also on a timm backbone (DER with pruning refuses one: see test_open.py)
TIMM_CASES = [(cls, options) for cls, options in CASES if options.get("prune") is not True]


def _ids(value) -> str:
    return value.__name__ if isinstance(value, type) else str(value)


@pytest.mark.parametrize(
    ("cls", "options", "backbone"),
    [(cls, options, "resnet20") for cls, options in CASES]
    + [(cls, options, "timm:test_resnet") for cls, options in TIMM_CASES],
    ids=_ids,
)
def test_method_runs_a_stream_and_its_checkpoint_rebuilds_it(cls, options, backbone, tmp_path):
    if backbone.startswith("timm:"):
        pytest.importorskip("timm")
    L.seed_everything(0)
    scenario = "task" if issubclass(cls, TaskMaskedModule) else "class"  # these need the task id at test time
    # the digits preset, not the timm model's 160 px input (that path is tested in test_open.py)
    dm = digits_stream(scenario, augmentation="digits")
    kwargs = {"memory_budget": 60} if "memory_budget" in inspect.signature(cls).parameters else {}
    kwargs.update(options)
    epochs = 2 if cls is methods.PackNet else 1  # PackNet prunes before its retraining epochs
    schedule = TaskSchedule(epochs=epochs, lr=0.02, milestones=[])
    model = cls(backbone=backbone, in_channels=1, schedule=schedule, **kwargs)
    trainer = make_trainer(tmp_path)
    run_stream(trainer, model, dm)
    assert model.head.out_features == 10 and model.task_index == 2
    recorded = {name: counts["correct"] for name, counts in model.last_evaluation.items()}

    fresh = cls(backbone=backbone, in_channels=1, schedule=schedule, **kwargs)
    fresh_dm = digits_stream(scenario, augmentation="digits")
    ckpt = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    make_trainer(tmp_path / "eval").test(fresh, datamodule=fresh_dm, ckpt_path=str(ckpt), verbose=False)
    assert {name: counts["correct"] for name, counts in fresh.last_evaluation.items()} == recorded
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a.cpu(), b.cpu()), name
