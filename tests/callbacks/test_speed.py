"""Speed options: channels-last weights across growth, pruning and reloading; torch.compile of the extractors."""

import lightning as L
import pytest
import torch
from conftest import make_trainer
from torch import nn

from lightning_cil import DER, Finetune, Piggyback, TaskSchedule, TaskStreamDataModule, run_stream
from lightning_cil.callbacks import ChannelsLast, CompileBackbone
from lightning_cil.callbacks.speed import compile_targets


def _digits(scenario: str = "class", **kw) -> TaskStreamDataModule:
    options = dict(
        dataset="digits", initial_classes=4, increment=3, class_order_seed=None, batch_size=64, num_workers=0
    )
    return TaskStreamDataModule(**{**options, "scenario": scenario, **kw})


def _schedule() -> TaskSchedule:
    return TaskSchedule(epochs=1, lr=0.02, milestones=[])


def _convolution_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.dim() == 4]


@pytest.mark.parametrize(
    ("build", "scenario"),
    [
        (lambda: DER(backbone="resnet20", in_channels=1, schedule=_schedule(), memory_budget=40, prune=True), "class"),
        (lambda: Piggyback(backbone="resnet20", in_channels=1, schedule=_schedule()), "task"),
    ],
    ids=["DER-pruned", "Piggyback"],
)
def test_channels_last_survives_growth_pruning_and_reloading(build, scenario, tmp_path):
    L.seed_everything(0)
    model = build()
    run_stream(make_trainer(tmp_path, callbacks=[ChannelsLast()]), model, _digits(scenario, max_train_per_class=60))
    weights = _convolution_weights(model)
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for _, p in weights)
    recorded = {name: counts["correct"] for name, counts in model.last_evaluation.items()}

    fresh = build()
    ckpt = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    trainer = make_trainer(tmp_path / "eval", callbacks=[ChannelsLast()])
    trainer.test(fresh, datamodule=_digits(scenario, max_train_per_class=60), ckpt_path=str(ckpt), verbose=False)
    assert {name: counts["correct"] for name, counts in fresh.last_evaluation.items()} == recorded
    assert all(p.is_contiguous(memory_format=torch.channels_last) for _, p in _convolution_weights(fresh))


def test_compile_targets_are_the_extractors():
    finetune = Finetune(backbone="resnet20", in_channels=1)
    assert [name for name, _ in compile_targets(finetune)] == ["backbone"]
    der = DER(backbone="resnet20", in_channels=1)
    der.backbone.expand()
    assert [name for name, _ in compile_targets(der)] == ["backbone.extractors.0", "backbone.extractors.1"]


def test_compile_refuses_what_would_recompile_every_step():
    with pytest.raises(ValueError, match=r"mode='fast' is unknown.*'max-autotune'"):
        CompileBackbone(mode="fast")
    with pytest.raises(ValueError, match="Piggyback.*parametrizations"):
        CompileBackbone()._compile(Piggyback(backbone="resnet20", in_channels=1))
    der = DER(backbone="resnet20", in_channels=1, prune=True)
    der.backbone.attach_gates(400.0)
    with pytest.raises(ValueError, match="forward hooks.*prune: false"):
        CompileBackbone()._compile(der)


@pytest.mark.slow
def test_compiled_stream_matches_the_eager_one(tmp_path):
    # minutes on a CPU: TorchDynamo and Inductor compile the ResNet for training, evaluation and the new extractor
    results = {}
    for name, callbacks in (("eager", []), ("compiled", [CompileBackbone()])):
        L.seed_everything(0)
        model = DER(backbone="resnet20", in_channels=1, schedule=_schedule(), memory_budget=40, balance_epochs=2)
        dm = _digits(max_train_per_class=40, max_test_per_class=20, increment=6)
        run_stream(make_trainer(tmp_path / name, callbacks=callbacks), model, dm)
        results[name] = model
    eager, compiled = results["eager"], results["compiled"]
    assert list(eager.state_dict()) == list(compiled.state_dict())  # compiled in place: same parameter names
    assert all(e._compiled_call_impl is not None for e in compiled.backbone.extractors)  # the grown one too
    for scorer, counts in eager.last_evaluation.items():  # Inductor's fused kernels round differently
        for a, b, n in zip(counts["correct"], compiled.last_evaluation[scorer]["correct"], counts["total"]):
            assert abs(a - b) <= 0.1 * n
