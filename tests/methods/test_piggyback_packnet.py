"""Piggyback and PackNet on PACS: zero forgetting by construction, 1 bit per weight, and what the masks buy."""

import json
import math

import lightning as L
import pytest
import torch
from conftest import make_trainer

from lightning_cil import Finetune, PackNet, Piggyback, TaskSchedule, TaskStreamDataModule, run_stream
from lightning_cil.networks.weight_masks import masked_layers

# About 2 minutes on 2 cores (a backbone trained on photo, then three streams): run with `pytest -m slow`.
pytestmark = pytest.mark.slow

DOMAINS = ["art_painting", "cartoon", "sketch"]


def _pacs(root, domains, scenario="task", per_class=25):
    return TaskStreamDataModule(
        dataset="domains",
        root=str(root),
        scenario=scenario,
        domains=domains,
        max_train_per_class=per_class,
        max_test_per_class=15,
        batch_size=32,
        num_workers=0,
    )


class _ProbeLogits(L.Callback):
    """After every task's closing evaluation: the logits of 16 test images of each seen task, computed with
    that task's mask, BatchNorm and head active."""

    def __init__(self) -> None:
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self.probes: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def on_test_end(self, trainer, pl_module) -> None:
        dataset = trainer.datamodule.test_dataset()
        for j in range(pl_module.task_index + 1):
            if j not in self.probes:
                images = [x for x, _, t in (dataset[i] for i in range(len(dataset))) if t == j][:16]
                self.probes[j] = torch.stack(images)
            pl_module.activate(j)
            self.logits[(pl_module.task_index, j)] = pl_module(self.probes[j]).clone()
        pl_module.activate(pl_module.task_index)


@pytest.fixture(scope="module")
def pretrained(pacs_root, tmp_path_factory):
    """A ResNet-20 trained by the framework on the photo domain (7 classes): the pretrained backbone."""
    root = tmp_path_factory.mktemp("photo")
    L.seed_everything(0)
    dm = _pacs(pacs_root, ["photo"], scenario="class", per_class=40)
    dm.hparams.initial_classes = 7
    model = Finetune(backbone="resnet20", schedule=TaskSchedule(epochs=6, lr=0.05, milestones=[5]))
    run_stream(make_trainer(root), model, dm)
    return root / "run" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def pacs_runs(pacs_root, pretrained, tmp_path_factory):
    """The three remaining domains as tasks (task id known), one run per variant, same seed and data."""
    adam = TaskSchedule(epochs=3, lr=1e-3, optimizer="adam", weight_decay=0.0, milestones=[2])
    variants = {
        "piggyback": (Piggyback, {}),
        "piggyback_task_bn": (Piggyback, {"task_batchnorm": True}),
        "classifier_only": (Piggyback, {"train_masks": False}),
        "packnet": (PackNet, {"retrain_epochs": 1, "prune_fraction": 0.75}),
    }
    runs = {}
    for name, (cls, options) in variants.items():
        root = tmp_path_factory.mktemp(name)
        L.seed_everything(0)
        model = cls(backbone="resnet20", schedule=adam, pretrained=str(pretrained), **options)
        probe = _ProbeLogits()
        run_stream(make_trainer(root, callbacks=[probe]), model, _pacs(pacs_root, DOMAINS))

        metrics = json.loads((root / "run" / "version_0" / "metrics.json").read_text())
        runs[name] = model, probe, metrics, root
    return runs


@pytest.mark.parametrize("name", ["piggyback", "piggyback_task_bn", "packnet"])
def test_earlier_tasks_logits_are_bitwise_unchanged(pacs_runs, name):
    model, probe, metrics, _ = pacs_runs[name]
    last = len(DOMAINS) - 1
    for j in range(last):
        own = slice(7 * j, 7 * (j + 1))  # task j's head (7 PACS classes per task)
        assert torch.equal(probe.logits[(j, j)][:, own], probe.logits[(last, j)][:, own]), f"task {j} changed"
    matrix = metrics["scorers"]["cnn"]["accuracy_matrix"]
    for j in range(last + 1):  # so the accuracies never move either
        assert all(matrix[t][j] == matrix[j][j] for t in range(j, last + 1)), matrix


def test_piggyback_stores_one_bit_per_masked_weight(pacs_runs):
    model, _, _, root = pacs_runs["piggyback"]
    n = sum(layer.parametrizations.weight.original.numel() for _, layer in masked_layers(model.backbone))
    folder = root / "run" / "version_0" / "checkpoints"
    states = [torch.load(folder / f"task{t:02d}.ckpt", weights_only=False)["state_dict"] for t in range(3)]
    for t, state in enumerate(states):
        assert state["task_masks"].dtype == torch.uint8 and state["task_masks"].shape == (t + 1, math.ceil(n / 8))
        assert sum(v.numel() for k, v in state.items() if k.endswith(".scores")) == 0  # no float scores kept
    added = states[2]["task_masks"].numel() - states[1]["task_masks"].numel()
    assert added == math.ceil(n / 8)


def test_packnet_owner_map_packs_the_tasks(pacs_runs):
    model = pacs_runs["packnet"][0]
    counts = model.owner_counts()
    total = sum(counts.values())
    # tasks 0 and 1 keep a quarter of the weights free when they are pruned; the last task takes the rest
    assert counts.get(0, 0) == 0 and set(counts) == {1, 2, 3}
    assert counts[1] == pytest.approx(0.25 * total, rel=0.02)
    assert counts[2] == pytest.approx(0.25 * 0.75 * total, rel=0.02)
    assert all(w.owner.dtype == torch.uint8 for w in model.weights)


def test_bad_inputs_are_named(pretrained, tmp_path):
    with pytest.raises(ValueError, match="does not fit the backbone"):
        Piggyback(backbone="resnet32", pretrained=str(pretrained))
    with pytest.raises(FileNotFoundError, match="pretrained='missing.pth' does not exist"):
        PackNet(backbone="resnet20", pretrained="missing.pth", retrain_epochs=1, schedule=TaskSchedule(epochs=2))
    model = Piggyback(backbone="resnet20", pretrained=str(pretrained))
    model.task_index = 0
    batch = (torch.zeros(2, 3, 64, 64), torch.zeros(2, dtype=torch.long), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"task id 3 is out of range: this model has learned tasks 0..0"):
        model._evaluate(batch)
