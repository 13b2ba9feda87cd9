"""What a user meets first: bad input answered in one line before training, and a quickstart that learns."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import REPO, cli
from test_cli import shrunk

from lightning_cil.networks import build_backbone


def _error_lines(stderr: str) -> list[str]:
    """stderr without Lightning's seed notice, which precedes every error of a configured run."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("Seed set to")]


def _assert_one_line(out, message: str) -> None:
    assert out.returncode == 2, out.stderr[-3000:]
    lines = _error_lines(out.stderr)
    assert len(lines) == 1 and lines[0].startswith("lightning-cil: error: "), out.stderr[-3000:]
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.init_args.schedule.epochs=-1"], r"error: schedule\.epochs=-1 must be at least 1\.$"),
        (["--model.init_args.first_task", "{epochs: 4, lr: -1}"], r"error: first_task\.lr=-1\.0 must be positive\."),
    ],
    ids=["epochs", "first_task_lr"],
)
def test_invalid_value_inside_a_typed_argument_is_one_line(tmp_path, override, message):
    """jsonargparse wraps the method's own check in its Union error; the user sees only the check's message."""
    out = cli("fit", *shrunk(tmp_path, *override))
    _assert_one_line(out, message)
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_pretrained_weights_of_another_architecture_is_one_line(tmp_path):
    weights = tmp_path / "resnet32.pth"
    torch.save(build_backbone("resnet32", in_channels=1).state_dict(), weights)
    out = cli(
        "fit",
        *shrunk(tmp_path),
        "--model.class_path",
        "lightning_cil.methods.Piggyback",
        "--model.init_args.backbone",
        "resnet20",
        "--model.init_args.pretrained",
        str(weights),
    )
    _assert_one_line(out, r"pretrained='.*resnet32\.pth' does not fit the backbone \(CifarResNet\): unexpected ")


@pytest.mark.parametrize(
    ("class_path", "reason"),
    [
        ("lightning_cil.methods.Foo", r"it cannot be imported \(module 'lightning_cil.methods' has no attribute"),
        ("torch.nn.Linear", "it is not an IncrementalModule subclass"),
    ],
)
def test_unknown_method_lists_the_available_ones(tmp_path, class_path, reason):
    out = cli("fit", *shrunk(tmp_path, "--model.class_path", class_path))
    _assert_one_line(out, rf"model\.class_path='{re.escape(class_path)}' is not a method: {reason}")
    assert "Available methods: BiC, DER, EWC, Finetune, ICaRL, Joint, LwF, PackNet, Piggyback, WA" in out.stderr


def test_other_parse_errors_keep_their_message_without_the_usage_block(tmp_path):
    out = cli("fit", *shrunk(tmp_path, "--data.batch_size", "abc"))
    assert out.returncode == 2
    assert 'lightning-cil: error: Parser key "data.batch_size"' in out.stderr
    assert "Expected a <class 'int'>. Got value: abc" in out.stderr
    assert "usage:" not in out.stderr and "Traceback" not in out.stderr


def test_venv_is_ignored_by_git():
    """The README's install creates .venv/ in the checkout."""
    assert ".venv/" in (REPO / ".gitignore").read_text().splitlines()
