"""The pre-trained-model methods (SimpleCIL, APER, RanPAC) on real images, offline.

The backbone is the project's own small ViT (``vit_micro_patch8_32``), pre-trained by
configs/backbone_vit_cifar10.yaml on five CIFAR-10 classes (weights in weights/, command in benchmarks/README.md).
The streams here use the five classes it never saw (dog, frog, horse, ship, truck), 100 training and 50 test images
each, 4 tasks (2 + 1 + 1 + 1 classes). Each method runs its stream once per module; the tests read those runs.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, CrashAtEpoch, cli, make_trainer
from safetensors.torch import load_file

from lightning_cil import TaskSchedule, TaskStreamDataModule, run_stream
from lightning_cil.methods import APER, Finetune, RanPAC, SimpleCIL
from lightning_cil.methods.prototypes import PrototypeModule
from lightning_cil.networks.vit_tuning import pet_parameters
from lightning_cil.stream import StreamCallback

WEIGHTS = REPO / "weights" / "vit_micro_patch8_32.cifar10_5cls.safetensors"
BACKBONE = "vit_micro_patch8_32"
UNSEEN = ("dog", "frog", "horse", "ship", "truck")
ADAPT = TaskSchedule(epochs=3, lr=0.05, momentum=0.9, weight_decay=5e-4, scheduler="cosine")


@pytest.fixture(scope="session")
def unseen_root(cifar10_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CIFAR-10 classes the backbone was not pre-trained on, as an ImageFolder tree of links."""
    root = tmp_path_factory.mktemp("cifar10_unseen")
    for split in ("train", "test"):
        (root / split).mkdir()
        for name in UNSEEN:
            (root / split / name).symlink_to(cifar10_root / split / name, target_is_directory=True)
    return root


def unseen_stream(root: Path, initial: int = 2, increment: int = 1, **overrides) -> TaskStreamDataModule:
    options = dict(
        dataset="imagefolder",
        root=str(root),
        augmentation="cifar10",
        initial_classes=initial,
        increment=increment,
        class_order_seed=None,
        max_train_per_class=100,
        max_test_per_class=50,
        batch_size=32,
        num_workers=0,
    )
    options.update(overrides)
    return TaskStreamDataModule(**options)


class Snapshots(StreamCallback):
    """The method's trainable-in-principle parts after every task: PET parameters, the ViT's own weights, the
    classifier's state."""

    def __init__(self) -> None:
        self.after: list[dict[str, dict[str, torch.Tensor]]] = []

    def on_task_evaluated(self, trainer, pl_module, stream, task) -> None:
        pet = {str(i): p.detach().cpu().clone() for i, p in enumerate(pet_parameters(pl_module.backbone))}
        own = {k: v.detach().cpu().clone() for k, v in pl_module.backbone.state_dict().items() if _is_vit_weight(k)}
        head = {k: v.detach().cpu().clone() for k, v in pl_module.head.state_dict().items()}
        self.after.append({"pet": pet, "vit": own, "head": head})


def _is_vit_weight(key: str) -> bool:
    return not any(part in key for part in ("adapter.", ".ssf.", "prompt"))


def _pretrained_vit() -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(WEIGHTS)).items()}


def _unwrapped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ViT weights under their timm names (a PET wraps each block's modules one level deeper)."""
    return {k.replace(".block.", ".").replace(".module.", "."): v for k, v in state.items()}


def _make(method: str, **options) -> PrototypeModule | Finetune:
    common = dict(backbone=BACKBONE, pretrained=str(WEIGHTS))
    if method == "SimpleCIL":
        return SimpleCIL(**common)
    if method == "APER":
        return APER(first_task=ADAPT, **common, **options)
    if method == "RanPAC":
        return RanPAC(first_task=ADAPT, projection_dim=512, **common, **options)
    schedule = TaskSchedule(epochs=3, lr=0.01, momentum=0.9, weight_decay=5e-4, milestones=[])
    return Finetune(schedule=schedule, **common)


def _run(
    method: str,
    root: Path,
    out: Path,
    datamodule: TaskStreamDataModule | None = None,
    extra_callbacks: list | None = None,
    **trainer_options,
):
    L.seed_everything(0)
    model = _make(method)
    snapshots = Snapshots()
    trainer = make_trainer(out, callbacks=[snapshots, *(extra_callbacks or [])], **trainer_options)
    summary = run_stream(trainer, model, datamodule or unseen_stream(root))
    metrics = json.loads((out / "run" / "version_0" / "metrics.json").read_text())
    return {"model": model, "summary": summary, "metrics": metrics, "snapshots": snapshots.after, "out": out}


@pytest.fixture(scope="module")
def runs(unseen_root: Path, tmp_path_factory: pytest.TempPathFactory):
    if not WEIGHTS.is_file():
        pytest.fail(f"{WEIGHTS.relative_to(REPO)} is missing: make it with configs/backbone_vit_cifar10.yaml")
    cache: dict[str, dict] = {}

    def run(method: str) -> dict:
        if method not in cache:
            cache[method] = _run(method, unseen_root, tmp_path_factory.mktemp(method))
        return cache[method]

    return run


def _average(run: dict) -> float:
    return run["metrics"]["summary"]["avg_incremental_accuracy"]


def test_simplecil_leaves_the_backbone_bitwise_unchanged(runs):
    run = runs("SimpleCIL")
    pretrained = _pretrained_vit()
    for task, snapshot in enumerate(run["snapshots"]):
        assert snapshot["vit"].keys() == pretrained.keys()
        for key, value in snapshot["vit"].items():
            assert torch.equal(value, pretrained[key]), (task, key)
    assert run["metrics"]["protocol"]["rehearsal_free"] is True
    assert run["metrics"]["protocol"]["weights"] == f"{BACKBONE} ({WEIGHTS})"


def test_simplecil_last_accuracy_does_not_depend_on_the_task_split(runs, unseen_root, tmp_path):
    """The same five classes as 2+1+1+1 and as 3+2 tasks: identical prototypes, identical last accuracy."""
    four_tasks = runs("SimpleCIL")
    two_tasks = _run("SimpleCIL", unseen_root, tmp_path, unseen_stream(unseen_root, initial=3, increment=2))
    assert torch.allclose(two_tasks["model"].head.prototypes, four_tasks["model"].head.prototypes, atol=1e-6)
    last = [run["model"].last_evaluation["prototype"]["correct"] for run in (four_tasks, two_tasks)]
    assert sum(last[0]) == sum(last[1])
    assert two_tasks["metrics"]["summary"]["last_accuracy"] == four_tasks["metrics"]["summary"]["last_accuracy"]


@pytest.mark.parametrize("method", ["SimpleCIL", "APER"])
def test_prototypes_of_old_classes_never_change(runs, method):
    """The prototype methods forget nothing by construction: a class's prototype is fixed once its task ends."""
    snapshots = runs(method)["snapshots"]
    for task in range(1, len(snapshots)):
        before, now = snapshots[task - 1]["head"]["prototypes"], snapshots[task]["head"]["prototypes"]
        assert torch.equal(now[: len(before)], before), task
        assert now[len(before) :].abs().sum() > 0  # the new classes got theirs


@pytest.mark.parametrize("method", ["APER", "RanPAC"])
def test_first_task_adaptation_changes_the_adapter_then_freezes_everything(runs, method):
    run = runs(method)
    model, snapshots = run["model"], run["snapshots"]
    fresh = _make(method)  # the adapter as initialised (its up-projection is zero)
    initial = [p.detach().clone() for p in pet_parameters(fresh.backbone)]
    adapted = snapshots[0]["pet"]
    assert any(not torch.equal(adapted[str(i)], p) for i, p in enumerate(initial))
    for task in range(1, len(snapshots)):
        for key, value in adapted.items():
            assert torch.equal(snapshots[task]["pet"][key], value), (task, key)
    pretrained = _pretrained_vit()
    for key, value in _unwrapped(snapshots[-1]["vit"]).items():
        assert torch.equal(value, pretrained[key]), key  # the ViT's own weights never train
    assert not any(p.requires_grad for p in model.parameters())
    assert [task["epochs"] for task in run["metrics"]["tasks"]] == [ADAPT.epochs, 0, 0, 0]


def test_ranpac_classifier_is_the_ridge_solution_of_all_tasks_at_once(runs):
    """G and C accumulated task by task give the weights that one solve on every task's features gives."""
    model = runs("RanPAC")["model"]
    data = model.task_data
    indices = torch.arange(len(data.labels))
    features = model.extract_features(data.subset(indices), network=model.features, dim=model.feature_dim())
    head = model.head
    h = head.project(features.to(head.projection.device)).double()
    targets = torch.nn.functional.one_hot(data.labels, head.out_features).double()
    gram = h.T @ h
    eye = torch.eye(len(gram), dtype=gram.dtype)
    expected = torch.linalg.solve(gram + head.ridge * eye, h.T @ targets)
    assert torch.allclose(head.gram, gram, rtol=1e-9, atol=1e-6)
    assert torch.allclose(head.weight.double(), expected, rtol=1e-4, atol=1e-6)
    assert 1e-8 <= float(head.ridge) <= 1e8


def test_pretrained_model_methods_beat_finetune_of_the_same_backbone(runs):
    finetune = _average(runs("Finetune"))
    for method in ("SimpleCIL", "APER", "RanPAC"):
        assert _average(runs(method)) > finetune + 10, (method, _average(runs(method)), finetune)


def test_a_rehearsal_free_method_with_a_memory_is_refused(unseen_root, tmp_path):
    class SimpleCILWithMemory(SimpleCIL):
        def memory_size(self) -> int:
            return 20

    model = SimpleCILWithMemory(backbone=BACKBONE, pretrained=str(WEIGHTS))
    with pytest.raises(ValueError, match="SimpleCILWithMemory is rehearsal-free"):
        run_stream(make_trainer(tmp_path), model, unseen_stream(unseen_root))
    assert not list(tmp_path.glob("**/*.ckpt"))


@pytest.mark.parametrize("method", ["APER", "SimpleCIL"])
def test_a_resumed_stream_ends_with_the_identical_accuracy_matrix(runs, unseen_root, tmp_path, method):
    """APER stopped in its first task's adaptation (mid-task, epoch 2 of 3) and SimpleCIL after its second task (a
    training-free task, restored without a fit) both resume to the accuracy matrix of the uninterrupted run."""
    reference = runs(method)["metrics"]["scorers"]["prototype"]["accuracy_matrix"]
    L.seed_everything(0)
    first = make_trainer(tmp_path, callbacks=[CrashAtEpoch(1)] if method == "APER" else [])
    if method == "APER":
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_stream(first, _make(method), unseen_stream(unseen_root))
        checkpoint = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    else:
        run_stream(first, _make(method), unseen_stream(unseen_root))
        checkpoint = tmp_path / "run" / "version_0" / "checkpoints" / "task01.ckpt"
        (tmp_path / "run" / "version_0" / "metrics.json").unlink()
    resumed = make_trainer(tmp_path)
    run_stream(resumed, _make(method), unseen_stream(unseen_root), ckpt_path=str(checkpoint))
    metrics = json.loads((tmp_path / "run" / "version_0" / "metrics.json").read_text())
    assert metrics["scorers"]["prototype"]["accuracy_matrix"] == reference
    assert metrics["resumes"][0]["checkpoint"] == str(checkpoint)


class AutocastProbe(L.Callback):
    """The dtype of the first block's qkv projection during training steps and during the evaluation."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, torch.dtype]] = set()

    def on_fit_start(self, trainer, pl_module) -> None:
        self._hook(pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._hook(pl_module)

    def _hook(self, pl_module) -> None:
        block = pl_module.backbone.blocks[0]
        qkv = getattr(block, "block", block).attn.qkv
        if not getattr(qkv, "_probed", False):
            stage = lambda: "train" if pl_module.training else "eval"  # noqa: E731
            qkv.register_forward_hook(lambda m, i, o: self.seen.add((stage(), o.dtype)))
            qkv._probed = True


@pytest.mark.slow
@pytest.mark.parametrize("method", ["SimpleCIL", "APER", "RanPAC"])
def test_bf16_mixed_runs_the_vit_in_bf16_and_keeps_the_statistics_in_fp32(runs, unseen_root, tmp_path, method):
    probe = AutocastProbe()
    run = _run(method, unseen_root, tmp_path, precision="bf16-mixed", extra_callbacks=[probe])
    head = run["model"].head
    statistics = [head.prototypes] if method != "RanPAC" else [head.gram, head.cross, head.weight]
    assert all(t.dtype in (torch.float32, torch.float64) and torch.isfinite(t).all() for t in statistics)
    assert ("eval", torch.bfloat16) in probe.seen and (method == "SimpleCIL" or ("train", torch.bfloat16) in probe.seen)
    assert abs(_average(run) - _average(runs(method))) < 5


@pytest.mark.slow
@pytest.mark.parametrize("method", ["SimpleCIL", "APER", "RanPAC"])
def test_a_two_process_stream_gives_the_classifier_and_accuracy_of_one_process(unseen_root, tmp_path, method):
    """The new classes' features are extracted in shards and gathered: the statistics (prototypes; RanPAC's G, C and
    ridge weights) are those of one process, and the accuracy reported under DDP is what one process measures."""
    config = REPO / "configs" / f"{method.lower()}_cifar100_vit.yaml"
    options = [
        "--config", str(config), "--data.dataset", "imagefolder", "--data.root", str(unseen_root),
        "--data.augmentation", "cifar10", "--data.protocol", "B0_Inc1", "--data.max_train_per_class", "60",
        "--data.max_test_per_class", "30", "--data.num_workers", "0", "--data.batch_size", "16",
        "--model.init_args.backbone", BACKBONE, "--model.init_args.pretrained", str(WEIGHTS),
        "--trainer.precision", "32", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
    ]  # fmt: skip
    if method != "SimpleCIL":
        options += ["--model.init_args.first_task.epochs", "1", "--data.initial_classes", "2", "--data.increment", "1"]
        options.remove("--data.protocol"), options.remove("B0_Inc1")
    if method == "RanPAC":
        options += ["--model.init_args.projection_dim", "256"]
    heads, reported = {}, {}
    for devices in (1, 2):
        out_dir = tmp_path / f"devices{devices}"
        extra = ["--trainer.devices", str(devices)] + (["--trainer.strategy", "ddp"] if devices == 2 else [])
        out = cli("fit", *options, *extra, "--trainer.default_root_dir", str(out_dir),
                  "--trainer.logger.init_args.save_dir", str(out_dir))  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        (metrics,) = out_dir.glob("*/version_0/metrics.json")
        reported[devices] = json.loads(metrics.read_text())["summary"]["last_accuracy"]
        state = torch.load(metrics.parent / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        heads[devices] = {k: v for k, v in state["state_dict"].items() if k.startswith("head.")}
    assert heads[1].keys() == heads[2].keys()
    for key in heads[1]:
        assert torch.allclose(heads[1][key].double(), heads[2][key].double(), rtol=1e-4, atol=1e-5), key
    checkpoint = next((tmp_path / "devices2").glob("*/version_0/checkpoints/last.ckpt"))
    evaluation = cli(
        "test", *options, "--trainer.devices", "1", "--trainer.default_root_dir", str(tmp_path / "eval"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "eval"), "--ckpt_path", str(checkpoint),
    )  # fmt: skip
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    scorer = "ridge" if method == "RanPAC" else "prototype"
    found = re.findall(
        rf"Evaluation after task \d+/\d+ \({scorer}\): accuracy on seen classes ([\d.]+)%", evaluation.stdout
    )
    assert found and float(found[-1]) == pytest.approx(reported[2], abs=0.01), evaluation.stdout[-2000:]


def test_pretrained_model_methods_refuse_training_in_later_tasks():
    with pytest.raises(ValueError, match="trains nothing after the first task"):
        APER(backbone=BACKBONE, pretrained=None, schedule=TaskSchedule(epochs=2))
    with pytest.raises(ValueError, match="adaptation=None trains nothing"):
        RanPAC(backbone=BACKBONE, pretrained=None, adaptation=None, first_task=TaskSchedule(epochs=2))
    with pytest.raises(ValueError, match="tunes or prompts a timm VisionTransformer"):
        APER(backbone="resnet20", pretrained=None)
    assert copy.deepcopy(SimpleCIL(backbone=BACKBONE, pretrained=None)).schedule.epochs == 0


@pytest.mark.parametrize("method", ["SimpleCIL", "APER", "RanPAC"])
def test_a_checkpoint_rebuilds_the_method_exactly(runs, unseen_root, tmp_path, method):
    run = runs(method)
    fresh = _make(method)
    checkpoint = run["out"] / "run" / "version_0" / "checkpoints" / "last.ckpt"
    make_trainer(tmp_path).test(fresh, datamodule=unseen_stream(unseen_root), ckpt_path=str(checkpoint), verbose=False)
    assert fresh.last_evaluation == run["model"].last_evaluation
    mine, theirs = fresh.state_dict(), run["model"].state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key].cpu(), theirs[key].cpu()), key
