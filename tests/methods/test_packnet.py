"""PackNet on a small digits stream: the pretrained network as its first task, training through evaluations inside
a fit, and the two phases (train, prune, retrain) of a task as two fits that resume exactly."""

import json

import lightning as L
import pytest
import torch
from conftest import CrashAtEpoch, digits_stream, make_trainer

from lightning_cil import PackNet, TaskSchedule, run_stream
from lightning_cil.networks import build_backbone
from lightning_cil.networks.weight_masks import masked_layers


def _digits(**overrides):
    """2 tasks of 5 classes, task id known."""
    options = dict(initial_classes=5, increment=5, max_train_per_class=30, max_test_per_class=10)
    options.update(overrides)
    return digits_stream("task", **options)


def _packnet(epochs: int = 3, retrain_epochs: int = 1, **options) -> PackNet:
    schedule = TaskSchedule(epochs=epochs, lr=0.02, milestones=[])
    return PackNet(backbone="resnet20", in_channels=1, schedule=schedule, retrain_epochs=retrain_epochs, **options)


def test_pretrained_weights_are_the_first_task_pruned_and_kept_frozen(tmp_path):
    """Half of each layer's pretrained weights, the largest, stay as they were through the whole stream and are
    used by every task; the stream's tasks share the other half (0.25 / 0.75 of it for task 0 / task 1)."""
    torch.manual_seed(3)
    pretrained = build_backbone("resnet20", 1)
    path = tmp_path / "pretrained.pth"
    torch.save(pretrained.state_dict(), path)
    originals = [layer.weight.detach().clone() for _, layer in masked_layers(pretrained)]
    L.seed_everything(0)
    model = _packnet(pretrained=str(path))
    run_stream(make_trainer(tmp_path), model, _digits())
    assert model.owner_counts().keys() == {1, 2, 3}
    for (_, layer), w, original in zip(masked_layers(model.backbone), model.weights, originals):
        kept = w.owner == 1
        assert int(kept.sum()) == original.numel() - int(0.5 * original.numel())
        assert original[kept].abs().min() >= original[~kept].abs().max()  # the largest magnitudes stay
        assert torch.equal(w.frozen[kept], original[kept])
        task0 = w.owner == 2
        assert int(task0.sum()) == pytest.approx(0.25 * int((~kept).sum()), abs=1)
        for task in (0, 1):
            model.activate(task)
            assert torch.equal(layer.weight[kept], original[kept]), task


class _EpochChanges(L.Callback):
    """Whether each training epoch moved the trainable weights of the first convolution."""

    def __init__(self) -> None:
        self.changed: list[bool] = []

    def _weight(self, pl_module):
        return masked_layers(pl_module.backbone)[0][1].parametrizations.weight.original.detach().clone()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = self._weight(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.changed.append(not torch.equal(self.start, self._weight(pl_module)))


def test_packnet_keeps_learning_after_an_evaluation_inside_its_fit(tmp_path):
    """With validation in the fit (and Lightning's sanity check before it), every epoch still trains the backbone."""
    L.seed_everything(0)
    changes = _EpochChanges()
    trainer = make_trainer(tmp_path, callbacks=[changes])
    run_stream(trainer, _packnet(), _digits(val_during_fit=True))
    assert changes.changed == [True] * 6, changes.changed


def _stream(root, crash_at: int | None = None, ckpt_path=None) -> PackNet:
    """2 tasks of 4 epochs: task 0 trains epochs 0-1 (fit 1), prunes, retrains epochs 2-3 (fit 2)."""
    L.seed_everything(0)
    model = _packnet(epochs=4, retrain_epochs=2)
    trainer = make_trainer(root, callbacks=[CrashAtEpoch(crash_at)] if crash_at is not None else [])
    run_stream(trainer, model, _digits(), ckpt_path=ckpt_path)
    return model


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("packnet_reference")
    return _stream(root), json.loads((root / "run" / "version_0" / "metrics.json").read_text())


@pytest.mark.parametrize(
    ("crash_at", "phase"), [(1, 0), (2, 0), (3, 1)], ids=["training", "before-pruning", "retraining"]
)
def test_packnet_resumed_in_either_phase_ends_like_an_uninterrupted_run(uninterrupted, tmp_path, crash_at, phase):
    reference, metrics = uninterrupted
    with pytest.raises(RuntimeError, match="simulated crash"):
        _stream(tmp_path / "killed", crash_at=crash_at)
    last = tmp_path / "killed" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["callbacks"]["TaskStream"]["phase"] == phase
    resumed = _stream(tmp_path / "resumed", ckpt_path=last)
    resumed_metrics = json.loads((tmp_path / "resumed" / "run" / "version_0" / "metrics.json").read_text())
    assert resumed_metrics["scorers"]["cnn"]["accuracy_matrix"] == metrics["scorers"]["cnn"]["accuracy_matrix"]
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
