"""Local loggers from the command line: TensorBoard instead of the default CSV, and the per-task progress bar."""

import json

import pytest
from conftest import REPO, cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    """The quickstart, 1 epoch per task, logged to TensorBoard, with the progress bar on."""
    root = tmp_path_factory.mktemp("tensorboard")
    out = cli(
        "fit",
        "--config",
        str(REPO / "configs" / "quickstart.yaml"),
        "--model.init_args.schedule",
        "{epochs: 1, lr: 0.02, milestones: []}",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--trainer.logger.init_args.name",
        "tb",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "tb" / "version_0", out


def test_tensorboard_logger_gets_the_stream_metrics_and_keeps_the_run_folder(tensorboard_run):
    run_dir, _ = tensorboard_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "config.yaml").is_file()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    average = [event.value for event in sorted(events.Scalars("stream/avg_incremental_accuracy"), key=lambda e: e.step)]
    assert len(average) == 5
    assert 100 * average[-1] == pytest.approx(metrics["summary"]["avg_incremental_accuracy"], abs=1e-3)
    assert "train/loss_epoch" in events.Tags()["scalars"]


def test_progress_bar_names_the_task_and_the_epoch(tensorboard_run):
    _, out = tensorboard_run
    for task in range(1, 6):
        assert f"Task {task}/5 · Epoch {task - 1}" in out.stdout  # Lightning's tqdm bar writes to stdout
