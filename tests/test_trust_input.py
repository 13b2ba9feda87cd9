"""What a user meets first: bad input answered in one line before training, and a quickstart that learns."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from conftest import REPO, assert_one_line, cli, run_main
from test_cli import QUICKSTART, shrunk

from lightning_cil.networks import build_backbone


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            ["--model.init_args.schedule.epochs=-1"],
            r"error: schedule\.epochs=-1 must be at least 0 \(0: the task trains nothing\)\.$",
        ),
        (["--model.init_args.first_task", "{epochs: 4, lr: -1}"], r"error: first_task\.lr=-1\.0 must be positive\."),
    ],
    ids=["epochs", "first_task_lr"],
)
def test_invalid_value_inside_a_typed_argument_is_one_line(tmp_path, monkeypatch, capsys, override, message):
    """jsonargparse wraps the method's own check in its Union error; the user sees only the check's message."""
    out = run_main(monkeypatch, capsys, "fit", *shrunk(tmp_path, *override))
    assert_one_line(out, message)
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_pretrained_weights_of_another_architecture_is_one_line(tmp_path, monkeypatch, capsys):
    weights = tmp_path / "resnet32.pth"
    torch.save(build_backbone("resnet32", in_channels=1).state_dict(), weights)
    out = run_main(
        monkeypatch,
        capsys,
        "fit",
        *shrunk(tmp_path),
        "--model.class_path",
        "lightning_cil.methods.Piggyback",
        "--model.init_args.backbone",
        "resnet20",
        "--model.init_args.pretrained",
        str(weights),
    )
    assert_one_line(out, r"pretrained='.*resnet32\.pth' does not fit the backbone \(CifarResNet\): unexpected ")


@pytest.mark.parametrize(
    ("class_path", "reason"),
    [
        ("lightning_cil.methods.Foo", r"it cannot be imported \(module 'lightning_cil.methods' has no attribute"),
        ("torch.nn.Linear", "it is not an IncrementalModule subclass"),
    ],
)
def test_unknown_method_lists_the_available_ones(tmp_path, monkeypatch, capsys, class_path, reason):
    out = run_main(monkeypatch, capsys, "fit", *shrunk(tmp_path, "--model.class_path", class_path))
    assert_one_line(out, rf"model\.class_path='{re.escape(class_path)}' is not a method: {reason}")
    assert (
        "Available methods: APER, BiC, CODAPrompt, DER, DualPrompt, EASE, EWC, Finetune, ICaRL, Joint, L2P, LwF, "
        "PackNet, Piggyback, RanPAC, SimpleCIL, SLCA, WA" in out.stderr
    )


def test_other_parse_errors_keep_their_message_without_the_usage_block(tmp_path, monkeypatch, capsys):
    out = run_main(monkeypatch, capsys, "fit", *shrunk(tmp_path, "--data.batch_size", "abc"))
    assert out.returncode == 2
    assert 'lightning-cil: error: Parser key "data.batch_size"' in out.stderr
    assert "Expected a <class 'int'>. Got value: abc" in out.stderr
    assert "usage:" not in out.stderr and "Traceback" not in out.stderr


def test_venv_is_ignored_by_git():
    """The README's install creates .venv/ in the checkout."""
    assert ".venv/" in (REPO / ".gitignore").read_text().splitlines()


def test_memory_budget_below_the_number_of_classes_is_refused_before_training(tmp_path, monkeypatch, capsys):
    out = run_main(
        monkeypatch,
        capsys,
        "fit",
        *shrunk(tmp_path, "--model.class_path", "lightning_cil.methods.ICaRL", "--model.init_args.memory_budget", "5"),
    )
    assert_one_line(out, r"memory_budget=5 is below the 10 classes of this stream: 5 of them would keep no exemplar")
    assert not list(tmp_path.glob("**/*.ckpt"))


@pytest.mark.parametrize("method", ["ICaRL", "BiC", "WA", "DER"])
def test_every_rehearsal_method_checks_its_budget_at_the_first_task_start(method):
    from lightning_cil import methods
    from lightning_cil.data.scenario import TaskInfo

    first = TaskInfo(index=0, num_tasks=5, new_classes=(0, 1), num_seen_classes=2, num_total_classes=10)
    cls = getattr(methods, method)
    with pytest.raises(ValueError, match="memory_budget=9 is below the 10 classes"):
        cls(backbone="resnet20", in_channels=1, memory_budget=9).on_task_start(first)
    cls(backbone="resnet20", in_channels=1, memory_budget=10).on_task_start(first)  # one exemplar per class: fine
    # a fixed per-class memory grows with the classes: never short
    cls(backbone="resnet20", in_channels=1, memory_budget=None, memory_per_class=1).on_task_start(first)


#: what a clean quickstart run must not print: advertisements, a torch deprecation inside Lightning, the stream's
#: deliberately empty validation loader, the cumulative max_epochs of the stream, and a logging interval longer
#: than a task's epoch
NOISE = (
    "litlogger",
    "litmodels",
    "LeafSpec",
    "Total length of `list` across ranks is zero",
    "smaller than the logging interval",
    "`Trainer.fit` stopped",
)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The quickstart exactly as configured (12 epochs per task, seed 1993), writing into a temporary folder."""
    out_dir = tmp_path_factory.mktemp("quickstart")
    out = cli(
        "fit",
        "--config",
        str(QUICKSTART),
        "--trainer.default_root_dir",
        str(out_dir),
        "--trainer.logger.init_args.save_dir",
        str(out_dir),
        "--trainer.enable_progress_bar",
        "false",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_quickstart_finetune_learns_every_new_task(quickstart):
    """Finetune forgets the old tasks but must learn each new one: the matrix diagonal, the last task included."""
    rows = re.findall(r"^T(\d)\s+([\d.\s]+)$", quickstart.stdout, flags=re.MULTILINE)
    assert len(rows) == 5, quickstart.stdout[-2000:]
    diagonal = [float(cells.split()[int(task)]) for task, cells in rows]
    assert min(diagonal) > 90, diagonal


def test_quickstart_prints_no_meaningless_notices(quickstart):
    found = [noise for noise in NOISE if noise in quickstart.stderr + quickstart.stdout]
    assert not found, quickstart.stderr[-3000:]
    # nor any other warning (file:line: message), except "Checkpoint directory ... exists and is not empty",
    # which the stream's own task checkpoints trigger
    warned = [
        line
        for line in quickstart.stderr.splitlines()
        if re.search(r"\.py:\d+: ", line) and "Checkpoint directory" not in line
    ]
    assert not warned, warned


@pytest.fixture(scope="module")
def tree_with_a_truncated_jpeg(cifar10_root, tmp_path_factory):
    """Two CIFAR-10 classes as an image folder (6 train, 3 test images each); one airplane is cut in half."""
    root = tmp_path_factory.mktemp("truncated")
    for split, count in (("train", 6), ("test", 3)):
        for name in ("airplane", "automobile"):
            (root / split / name).mkdir(parents=True)
            for image in sorted((cifar10_root / split / name).iterdir())[:count]:
                shutil.copy(image, root / split / name / image.name)
    bad = sorted((root / "train" / "airplane").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return root, bad


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_jpeg_is_one_line_naming_the_file_with_and_without_loader_workers(
    tmp_path, tree_with_a_truncated_jpeg, workers
):
    """With workers the error is raised in a worker process and re-raised by torch's DataLoader."""
    root, bad = tree_with_a_truncated_jpeg
    out = cli(
        "fit",
        *shrunk(tmp_path),
        "--data.dataset",
        "imagefolder",
        "--data.root",
        str(root),
        "--data.in_memory",
        "false",
        "--data.augmentation",
        "cifar10",
        "--data.protocol",
        "B0_Inc1",
        "--data.batch_size",
        "4",
        "--data.num_workers",
        str(workers),
    )
    assert_one_line(out, rf"error: cannot read image file {re.escape(str(bad))}: \S")
