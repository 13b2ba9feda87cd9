"""Piggyback and PackNet checkpoints only load into the network their masks were made for."""

import lightning as L
import pytest
import torch
from conftest import digits_stream, make_trainer

from lightning_cil import PackNet, Piggyback, TaskSchedule, run_stream


def _digits():
    return digits_stream("task", initial_classes=5, increment=5, max_train_per_class=40, max_test_per_class=20)


def _model(cls, backbone: str = "resnet20"):
    options = {"retrain_epochs": 1} if cls is PackNet else {"mask_lr": 1e-3}
    return cls(backbone=backbone, in_channels=1, schedule=TaskSchedule(epochs=2, lr=0.01, milestones=[]), **options)


@pytest.fixture(scope="module", params=[Piggyback, PackNet], ids=lambda c: c.__name__)
def trained(request, tmp_path_factory):
    """One method after a 2-task digits stream, and its last checkpoint."""
    root = tmp_path_factory.mktemp(request.param.__name__)
    L.seed_everything(0)
    run_stream(make_trainer(root), _model(request.param), _digits())
    return request.param, root / "run" / "version_0" / "checkpoints" / "last.ckpt"


def _test(model, ckpt, tmp_path):
    make_trainer(tmp_path).test(model, datamodule=_digits(), ckpt_path=str(ckpt), verbose=False)


def test_checkpoint_of_another_backbone_is_refused(trained, tmp_path):
    cls, ckpt = trained
    with pytest.raises(
        ValueError, match="it holds backbone='resnet20' but this run is configured with backbone='resnet32'"
    ):
        _test(_model(cls, "resnet32"), ckpt, tmp_path)


def test_mask_of_another_shape_is_refused(trained, tmp_path):
    cls, ckpt = trained
    checkpoint = torch.load(ckpt, weights_only=False)
    state = checkpoint["state_dict"]
    if cls is Piggyback:  # the packed masks: one byte short per task
        state["task_masks"] = state["task_masks"][:, :-1]
        message = "masks hold .* bytes per task but this backbone needs"
    else:  # one layer's owner map transposed, as if from a network with other layer widths
        key = next(
            k for k in state if k.endswith("parametrizations.weight.0.owner") and state[k].shape[0] != state[k].shape[1]
        )
        state[key] = state[key].transpose(0, 1).contiguous()
        message = f"the checkpoint's {key} has shape .* but this backbone's has .*another architecture"
    bad = tmp_path / "bad.ckpt"
    torch.save(checkpoint, bad)
    with pytest.raises(ValueError, match=message):
        _test(_model(cls), bad, tmp_path)


def test_mask_learning_rate_applies_to_the_scores_only():
    model = _model(Piggyback)
    model.on_task_start(_digits_task())
    groups = model.configure_optimizers()["optimizer"].param_groups
    scores = {id(m.scores) for m in model.masks}
    assert [g["lr"] for g in groups] == [0.01, 1e-3]
    assert {id(p) for p in groups[1]["params"]} == scores and not scores & {id(p) for p in groups[0]["params"]}
    with pytest.raises(ValueError, match="mask_lr=0.0 must be positive"):
        Piggyback(backbone="resnet20", mask_lr=0.0)


def _digits_task():
    dm = _digits()
    dm.prepare_stream()
    return dm.task_info(0)
