"""W&B from YAML, offline: the run's history, metric axes, table, heatmaps, config, and resume into the same run.

The offline run is read from its transaction log (``run-<id>.wandb``): a LevelDB-format log of protobuf
``Record`` messages. wandb 0.31 ships no Python reader for it, so ``_records`` below decodes the framing.
"""

import json
import struct
from pathlib import Path

import pytest
from conftest import REPO, cli
from wandb.proto import wandb_internal_pb2

CONFIG = REPO / "configs" / "quickstart_wandb.yaml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Records of a .wandb file: 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte header
    (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last); a block tail shorter than a header is padding."""
    data, block = path.read_bytes(), 32 * 1024
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a W&B transaction log"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


class OfflineRun:
    """What a test needs from one offline run folder (``wandb/offline-run-<time>-<id>``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        records = _records(next(folder.glob("run-*.wandb")))
        self.run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        self.history = [
            {".".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item}
            for r in records
            if r.WhichOneof("record_type") == "history"
        ]
        self.step_metrics = {r.metric.name: r.metric.step_metric for r in records if r.metric.name}
        self.config = {}
        for r in records:
            if r.WhichOneof("record_type") == "config":
                self.config.update({u.key: json.loads(u.value_json) for u in r.config.update if u.key})

    def rows(self, key: str) -> list[dict]:
        return [row for row in self.history if key in row]


def _loggers(root: Path) -> str:
    """The example config's two loggers, writing into ``root``."""
    wandb_args = {"save_dir": str(root), "project": "lightning-cil-tests", "group": "digits", "tags": ["test"]}
    return json.dumps(
        [
            {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root), "name": "q"}},
            {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": wandb_args},
        ]
    )


def _fit(root: Path, *extra: str):
    out = cli(
        "fit",
        "--config",
        str(CONFIG),
        "--model.class_path",
        "lightning_cil.methods.ICaRL",  # two scorers and an exemplar memory: every dashboard key appears
        "--model.init_args.memory_budget",
        "40",
        "--model.init_args.schedule",
        "{epochs: 1, lr: 0.02, milestones: []}",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger",
        _loggers(root),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def offline_runs(tmp_path_factory):
    """One 5-task stream, then a second process resuming it from the task-2 checkpoint."""
    root = tmp_path_factory.mktemp("wandb_stream")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        _fit(root)
        (run_dir,) = root.glob("q/version_*")
        first = {p.name for p in root.glob("wandb/offline-run-*")}
        _fit(root, "--ckpt_path", str(run_dir / "checkpoints" / "task02.ckpt"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (resumed,) = {p.name for p in root.glob("wandb/offline-run-*")} - first
    return OfflineRun(root / "wandb" / first.pop()), OfflineRun(root / "wandb" / resumed), metrics


def test_one_run_with_group_tags_and_the_resolved_config(offline_runs):
    run, _, _ = offline_runs
    assert run.run.run_group == "digits" and list(run.run.tags) == ["test"]
    assert run.config["model"]["class_path"] == "lightning_cil.methods.ICaRL"
    assert run.config["data"]["protocol"] == "B0_Inc2" and run.config["seed_everything"] == 1993


def test_per_task_metrics_use_the_task_axis_and_match_metrics_json(offline_runs):
    run, _, metrics = offline_runs
    for key in (
        "stream/accuracy_seen",
        "stream/num_parameters",
        "stream/memory_size",
        "stream/nme/avg_incremental_accuracy",
        "stream/cnn/average_forgetting",
    ):
        assert run.step_metrics[key] == "task", key
    rows = run.rows("stream/nme/avg_incremental_accuracy")
    assert [row["task"] for row in rows] == [0, 1, 2, 3, 4]
    assert [row["stream/memory_size"] for row in rows] == [40] * 5
    summary = metrics["summary"]
    assert 100 * rows[-1]["stream/nme/avg_incremental_accuracy"] == pytest.approx(summary["avg_incremental_accuracy"])
    assert 100 * rows[-1]["stream/nme/average_forgetting"] == pytest.approx(summary["average_forgetting"])
    parameters = [row["stream/num_parameters"] for row in run.rows("stream/num_parameters")]
    assert parameters == [task["num_parameters"] for task in metrics["tasks"]]


def test_accuracy_matrix_table_heatmaps_and_curve_after_every_task(offline_runs):
    run, _, metrics = offline_runs
    tables = [row["stream/accuracy_matrix.path"] for row in run.rows("stream/accuracy_matrix.path")]
    assert len(tables) == 5
    table = json.loads((run.folder / "files" / tables[-1]).read_text())
    assert table["columns"] == ["after task", "T0", "T1", "T2", "T3", "T4", "seen"]
    expected = metrics["scorers"]["nme"]["accuracy_matrix"]
    for row, want in zip(table["data"], expected):
        assert row[1:6] == [None if v is None else pytest.approx(v, abs=0.006) for v in want]
    key = "stream/accuracy_matrix_heatmap.path"
    images = [run.folder / "files" / row[key] for row in run.rows(key)]
    assert len(images) == 5 and all(path.read_bytes()[:8] == PNG_SIGNATURE for path in images)
    assert len(run.rows("stream/accuracy_curve_table.path")) == 5


def test_resumed_stream_continues_the_same_wandb_run(offline_runs):
    first, resumed, _ = offline_runs
    assert resumed.run.run_id == first.run.run_id
    assert [row["task"] for row in resumed.rows("stream/nme/avg_incremental_accuracy")] == [3, 4]
