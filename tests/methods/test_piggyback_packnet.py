"""Piggyback and PackNet on PACS: zero forgetting by construction, 1 bit per weight, and what the masks buy.

The shipped configs, shrunk by command-line overrides: configs/backbone_cifar10.yaml trains a ResNet-20 on
CIFAR-10 (300 images per class, 10 epochs), then configs/piggyback_pacs.yaml and configs/packnet_pacs.yaml learn
the PACS domains art_painting, cartoon and sketch as three 7-class tasks (80 train / 40 test images per class,
8 epochs, 32 px). Calibration run (seed 1993, backbone 50.4% on CIFAR-10), last accuracy on art / cartoon / sketch:
classifier only 24.5 / 33.7 / 32.3, Piggyback 26.0 / 50.2 / 46.0, Piggyback with task BatchNorm 31.8 / 53.2 / 60.5,
PackNet 21.3 / 42.3 / 50.0 (individually fine-tuned networks in benchmarks/README.md). The PackNet numbers
predate keeping half of the pretrained weights frozen as its first task and are not re-measured.
"""

import json
import math

import pytest
import torch
from conftest import REPO, cli

from lightning_cil import PackNet, Piggyback, TaskSchedule
from lightning_cil.networks.weight_masks import masked_layers

# About 23 minutes on 2 cores shared with other jobs (a CIFAR-10 backbone, then four PACS streams): `pytest -m slow`.
pytestmark = pytest.mark.slow

DOMAINS = ["art_painting", "cartoon", "sketch"]

#: the backbone run: CIFAR-10's 10 classes as one task, shrunk
BACKBONE_OVERRIDES = (
    "--data.max_train_per_class", "300",
    "--data.max_test_per_class", "100",
    "--data.batch_size", "64",
    "--model.init_args.schedule", "{epochs: 10, lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4, milestones: [7]}",
)  # fmt: skip

#: the PACS streams, shrunk: 8 epochs of Adam at 1e-3 for heads (and PackNet's weights), 1e-4 for Piggyback's scores
PACS_OVERRIDES = (
    "--data.max_train_per_class", "80",
    "--data.max_test_per_class", "40",
    "--model.init_args.schedule", "{epochs: 8, lr: 1.0e-3, optimizer: adam, weight_decay: 0.0, milestones: [6]}",
)  # fmt: skip

VARIANTS = {
    "classifier_only": ("piggyback_pacs", ["--model.init_args.train_masks", "false"]),
    "piggyback": ("piggyback_pacs", ["--model.init_args.mask_lr", "1.0e-4"]),
    "piggyback_task_bn": (
        "piggyback_pacs",
        ["--model.init_args.mask_lr", "1.0e-4", "--model.init_args.task_batchnorm", "true"],
    ),
    "packnet": ("packnet_pacs", ["--model.init_args.retrain_epochs", "2"]),
}


def _fit(config: str, root: str, out_dir, *overrides: str) -> dict:
    out = cli(
        "fit",
        "--config", str(REPO / "configs" / f"{config}.yaml"),
        "--data.root", str(root),
        "--data.num_workers", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.deterministic", "true",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(out_dir),
        "--trainer.logger.init_args.save_dir", str(out_dir),
        *overrides,
        timeout=3600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (metrics,) = out_dir.glob(f"{config}/version_*/metrics.json")
    return {"metrics": json.loads(metrics.read_text()), "run_dir": metrics.parent}


@pytest.fixture(scope="module")
def pretrained(cifar10_root, tmp_path_factory):
    """The framework's own CIFAR-10 ResNet-20: the frozen backbone of every PACS stream."""
    run = _fit("backbone_cifar10", cifar10_root, tmp_path_factory.mktemp("backbone"), *BACKBONE_OVERRIDES)
    assert run["metrics"]["summary"]["last_accuracy"] > 35  # a real backbone (calibration run: 47.1% on 10 classes)
    return run["run_dir"] / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def pacs_runs(pacs_root, pretrained, tmp_path_factory, monkeypatch_module):
    """The three domains as tasks (task id known), one run per variant, same seed and data."""
    monkeypatch_module.setenv("PYTHONPATH", str(REPO / "tests"))
    runs = {}
    for name, (config, options) in VARIANTS.items():
        out_dir = tmp_path_factory.mktemp(name)
        probe = out_dir / "probe.pt"
        run = _fit(
            config,
            pacs_root,
            out_dir,
            *PACS_OVERRIDES,
            "--model.init_args.pretrained", str(pretrained),
            "--trainer.callbacks+=mask_probe.ProbeLogits",
            "--trainer.callbacks.out", str(probe),
            *options,
        )  # fmt: skip
        run["probe"] = torch.load(probe)
        run["accuracy"] = run["metrics"]["scorers"]["cnn"]["accuracy_matrix"][-1]
        runs[name] = run
    print({name: [round(a, 1) for a in run["accuracy"]] for name, run in runs.items()})
    return runs


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.parametrize("name", ["piggyback", "piggyback_task_bn", "packnet"])
def test_earlier_tasks_logits_are_bitwise_unchanged(pacs_runs, name):
    run = pacs_runs[name]
    last = len(DOMAINS) - 1
    for j in range(last):
        own = slice(7 * j, 7 * (j + 1))  # task j's head (7 PACS classes per task)
        assert torch.equal(run["probe"][(j, j)][:, own], run["probe"][(last, j)][:, own]), f"task {j} changed"
    matrix = run["metrics"]["scorers"]["cnn"]["accuracy_matrix"]
    for j in range(last + 1):  # so the accuracies never move either
        assert all(matrix[t][j] == matrix[j][j] for t in range(j, last + 1)), matrix


def test_piggyback_beats_the_classifier_only_baseline(pacs_runs):
    """The masks adapt the frozen CIFAR-10 features to each domain; a new head alone cannot."""
    baseline, piggyback = pacs_runs["classifier_only"]["accuracy"], pacs_runs["piggyback"]["accuracy"]
    assert all(p > b for p, b in zip(piggyback, baseline)), (piggyback, baseline)
    assert sum(piggyback) / 3 >= sum(baseline) / 3 + 3, (piggyback, baseline)


def test_task_batchnorm_helps_on_sketch(pacs_runs):
    """Sketches are far from CIFAR-10's photos: with frozen BatchNorm the masked network's activations no longer
    match the pretrained statistics; per-task BatchNorm re-estimates them (the paper's ablation)."""
    sketch = DOMAINS.index("sketch")
    with_bn = pacs_runs["piggyback_task_bn"]["accuracy"][sketch]
    without = pacs_runs["piggyback"]["accuracy"][sketch]
    assert with_bn >= without + 5, (with_bn, without)


def test_piggyback_stores_one_bit_per_masked_weight(pacs_runs):
    n = sum(
        layer.parametrizations.weight.original.numel() for _, layer in masked_layers(Piggyback("resnet20").backbone)
    )
    folder = pacs_runs["piggyback"]["run_dir"] / "checkpoints"
    states = [torch.load(folder / f"task{t:02d}.ckpt", weights_only=False)["state_dict"] for t in range(3)]
    for t, state in enumerate(states):
        assert state["task_masks"].dtype == torch.uint8 and state["task_masks"].shape == (t + 1, math.ceil(n / 8))
        assert sum(v.numel() for k, v in state.items() if k.endswith(".scores")) == 0  # no float scores kept
    added = states[2]["task_masks"].numel() - states[1]["task_masks"].numel()
    assert added == math.ceil(n / 8)


def test_packnet_owner_map_packs_the_tasks(pacs_runs):
    state = torch.load(pacs_runs["packnet"]["run_dir"] / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    owners = [v for k, v in state.items() if k.endswith(".owner")]
    assert owners and all(o.dtype == torch.uint8 for o in owners)
    counts = torch.bincount(torch.cat([o.flatten() for o in owners]).long()).tolist()
    total = sum(counts)
    # the pretrained network keeps half of its weights (code 1); tasks 0 and 1 keep a quarter of the weights free
    # when they are pruned; the last task takes the rest
    assert counts[0] == 0 and len(counts) == 5
    assert counts[1] == pytest.approx(0.5 * total, rel=0.02)
    assert counts[2] == pytest.approx(0.25 * 0.5 * total, rel=0.02)
    assert counts[3] == pytest.approx(0.25 * 0.75 * 0.5 * total, rel=0.02)


def test_bad_inputs_are_named(pretrained):
    with pytest.raises(ValueError, match="does not fit the backbone"):
        Piggyback(backbone="resnet32", pretrained=str(pretrained))
    with pytest.raises(FileNotFoundError, match="pretrained='missing.pth' does not exist"):
        PackNet(backbone="resnet20", pretrained="missing.pth", retrain_epochs=1, schedule=TaskSchedule(epochs=2))
    model = Piggyback(backbone="resnet20", pretrained=str(pretrained))
    model.task_index = 0
    batch = (torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"task id 3 is out of range: this model has learned tasks 0..0"):
        model._evaluate(batch)
