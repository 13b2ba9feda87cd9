"""The `lightning-cil` command as users run it: the quickstart config, shrunk by command-line overrides."""

import json
import re
from pathlib import Path

import pytest
from conftest import REPO, cli, run_main

from lightning_cil.cli import main

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def shrunk(tmp_path: Path, *extra: str) -> list[str]:
    """The quickstart with 2 epochs per task, writing into tmp_path (momentum as before the quickstart dropped it:
    the thresholds of the tests on these runs were set with it)."""
    return [
        "--config",
        str(QUICKSTART),
        "--model.init_args.schedule",
        "{epochs: 2, lr: 0.02, momentum: 0.9, milestones: []}",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


def _run_dir(tmp_path: Path) -> Path:
    (metrics,) = tmp_path.glob("quickstart/version_*/metrics.json")
    return metrics.parent


def _evaluate(subcommand: str, checkpoint: Path, out_dir: Path) -> tuple[int, float]:
    """Run `lightning-cil test|validate` on a checkpoint; return (tasks seen, accuracy on seen classes in %)."""
    out = cli(
        subcommand,
        "--config",
        str(QUICKSTART),
        "--ckpt_path",
        str(checkpoint),
        "--trainer.default_root_dir",
        str(out_dir),
        "--trainer.logger.init_args.save_dir",
        str(out_dir),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = re.search(r"Evaluation after task (\d+)/\d+ \(cnn\): accuracy on seen classes ([\d.]+)%", out.stdout)
    assert found is not None, out.stdout[-2000:]
    return int(found.group(1)), float(found.group(2))


@pytest.mark.parametrize(
    "config", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO / "configs"))
)
def test_every_shipped_config_parses(config, capsys):
    """In this process (one interpreter start-up for all configs; the command itself is run by the tests below)."""
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config), "--print_config"])
    out = capsys.readouterr()
    assert stop.value.code in (0, None), out.err[-2000:]
    assert "class_path: lightning_cil.methods." in out.out


def test_print_config_shows_every_section():
    out = cli("fit", "--config", str(QUICKSTART), "--print_config")
    assert out.returncode == 0, out.stderr
    for expected in (
        "class_path: lightning_cil.methods.Finetune",
        "protocol: B0_Inc2",
        "dataset: digits",
        "epochs: 12",
        "accelerator: cpu",
        "seed_everything: 1993",
    ):
        assert expected in out.stdout


def test_fit_runs_the_whole_stream_and_test_reproduces_it_from_the_checkpoint(tmp_path):
    out = cli("fit", *shrunk(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Accuracy matrix (cnn, %)" in out.stdout and "average incremental accuracy:" in out.stdout
    run = _run_dir(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["tasks"]) == 5 and metrics["summary"]["avg_incremental_accuracy"] > 0
    assert (run / "config.yaml").is_file()
    tasks, accuracy = _evaluate("test", run / "checkpoints" / "last.ckpt", tmp_path / "eval")
    assert tasks == 5 and accuracy == pytest.approx(metrics["summary"]["last_accuracy"], abs=0.01)
    tasks, accuracy = _evaluate("validate", run / "checkpoints" / "task01.ckpt", tmp_path / "val")
    assert tasks == 2 and accuracy == pytest.approx(metrics["scorers"]["cnn"]["accuracy_seen"][1], abs=0.01)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--trainer.max_epochs", "3"], "trainer.max_epochs=3 has no effect on a task stream"),
        (["--data.protocol", "B0_Inc3"], "initial_classes=3 and increment=3 do not cover the 10 classes"),
        (
            ["--data.class_order", "[0,1,2,3,4,5,6,7,8,8]", "--data.class_order_seed", "null"],
            r"class_order lists classes more than once: \['8'\]",
        ),
        (
            ["--data.dataset", "cifar10", "--data.root", "no/such/dir"],
            r"dataset path 'no/such/dir' does not exist; expected layout: no/such/dir/train/<class>/<image>",
        ),
        (["--ckpt_path", "best"], r"ckpt_path='best' does not exist; give a checkpoint file of this stream, or 'last'"),
    ],
)
def test_bad_configuration_is_one_clear_line(tmp_path, monkeypatch, capsys, override, message):
    out = run_main(monkeypatch, capsys, "fit", *shrunk(tmp_path, *override))
    assert out.returncode == 2
    assert re.search(message, out.stderr), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not list(tmp_path.glob("**/*.ckpt"))  # refused before any training


@pytest.mark.slow
def test_bf16_mixed_precision_stream(tmp_path):
    out = cli(
        "fit",
        *shrunk(tmp_path, "--trainer.precision", "bf16-mixed"),
        "--model.class_path",
        "lightning_cil.methods.DER",
        "--model.init_args.backbone",
        "resnet20",
        "--model.init_args.memory_budget",
        "40",
        "--model.init_args.balance_epochs",
        "2",
        "--model.init_args.prune",
        "true",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((_run_dir(tmp_path) / "metrics.json").read_text())
    assert len(metrics["tasks"]) == 5 and metrics["summary"]["avg_incremental_accuracy"] > 20
