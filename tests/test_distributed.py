"""Streams under DDP on CPU (gloo): every method, a changed process count on resume, launcher restarts, two nodes.

Every test runs the quickstart (digits) shrunk to 2 epochs per task, one to three minutes each on 2 cores. The
default suite runs the 2-process iCaRL and DER streams; the others are slow: run them with `pytest -m slow`.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli
from test_cli import shrunk

DDP = ("--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu")

#: options beyond the quickstart's (which configures Finetune)
REHEARSAL = {
    "ICaRL": ("--model.init_args.memory_budget", "50", "--model.init_args.backbone", "resnet20"),
    "DER": (
        "--model.init_args.memory_budget",
        "50",
        "--model.init_args.backbone",
        "resnet20",
        "--model.init_args.prune",
        "true",
    ),
}
METHODS = {
    **REHEARSAL,
    "Finetune": (),
    "LwF": (),
    "EWC": (),
    "WA": ("--model.init_args.memory_budget", "50"),
    "BiC": ("--model.init_args.memory_budget", "50", "--model.init_args.bias_epochs", "50"),
    "Joint": (),
    # task-incremental: a frozen (here randomly initialised) backbone, the task id known at test time
    "Piggyback": ("--data.scenario", "task"),
    "PackNet": ("--data.scenario", "task", "--model.init_args.retrain_epochs", "1"),
}


def _method(name: str) -> list[str]:
    return ["--model.class_path", f"lightning_cil.methods.{name}", *METHODS[name]]


def _metrics(out_dir: Path, newest: bool = False) -> tuple[Path, dict]:
    """The run folder holding the metrics.json under out_dir (the one there is, or the newest version's)."""
    found = sorted(out_dir.glob("quickstart/version_*/metrics.json"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not newest:
        assert len(found) == 1, found
    return found[-1].parent, json.loads(found[-1].read_text())


def _full(matrix: list[list[float | None]]) -> bool:
    """Every (task, earlier task) entry of the accuracy matrix was measured."""
    return all(row[j] is not None for i, row in enumerate(matrix) for j in range(i + 1))


def _crash(tmp_path: Path, epoch: int, rank: int, hard: bool) -> tuple[str, ...]:
    """Options adding tests/crash_once.py's callback (needs tests/ on PYTHONPATH)."""
    return (
        "--trainer.callbacks+=crash_once.CrashOnce",
        "--trainer.callbacks.epoch",
        str(epoch),
        "--trainer.callbacks.rank",
        str(rank),
        "--trainer.callbacks.hard",
        str(hard).lower(),
        "--trainer.callbacks.marker",
        str(tmp_path / "crashed.txt"),
    )


def _torchrun(*args: str, log: Path, **extra_env: str) -> subprocess.Popen:
    """Start `torchrun ARGS` (as `python -m torch.distributed.run`) from the repository root, output into ``log``,
    in a process group of its own (see :func:`_wait`)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO / "tests")}
    env.update(extra_env)
    command = [sys.executable, "-m", "torch.distributed.run", *args]
    with log.open("w") as handle:  # the child keeps its own copy of the file descriptor
        return subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env, start_new_session=True
        )


def _wait(jobs: list[subprocess.Popen], timeout: int = 900) -> list[int]:
    """Exit codes of ``jobs``; a job still running after ``timeout`` seconds is killed with its workers."""
    try:
        return [job.wait(timeout=timeout) for job in jobs]
    finally:
        for job in jobs:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _single_process_accuracy(checkpoint: Path, out_dir: Path, *options: str) -> dict[str, float]:
    """`lightning-cil test` of a checkpoint on one process: accuracy on the seen classes in %, per scorer."""
    out = cli("test", *shrunk(out_dir, *options), "--ckpt_path", str(checkpoint))
    assert out.returncode == 0, out.stderr[-3000:]
    found = re.findall(r"Evaluation after task 5/5 \((\w+)\): accuracy on seen classes ([\d.]+)%", out.stdout)
    assert found, out.stdout[-2000:]
    return {scorer: float(accuracy) for scorer, accuracy in found}


def _assert_reported_equals_one_process(run: Path, metrics: dict, tmp_path: Path, *options: str) -> None:
    """Every scorer's final accuracy (rank shards summed through torchmetrics) is what one process measures."""
    measured = _single_process_accuracy(run / "checkpoints" / "last.ckpt", tmp_path / "eval", *options)
    reported = {scorer: values["accuracy_seen"][-1] for scorer, values in metrics["scorers"].items()}
    assert measured.keys() == reported.keys()
    for scorer, accuracy in measured.items():
        assert accuracy == pytest.approx(reported[scorer], abs=0.01), scorer


def _assert_ranks_agree(dump: Path, tasks: range) -> None:
    for task in tasks:
        rank0 = json.loads((dump / f"rank0_task{task}.json").read_text())
        rank1 = json.loads((dump / f"rank1_task{task}.json").read_text())
        assert rank0 == rank1, f"ranks differ after task {task}: {rank0} vs {rank1}"


def _two_process_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> tuple[Path, dict]:
    """Run ``method``'s stream on 2 processes; check that rank 0 alone reports, that both ranks hold the same model and
    method state after every task, and that the reported accuracies are what one process measures on the saved
    checkpoint. Returns the folder of the ranks' state dumps (``rank<r>_task<t>.json``) and metrics.json."""
    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests"))
    dump = tmp_path / "ranks"
    options = _method(method)
    callbacks = ("--trainer.callbacks+=rank_dump.RankStateDump", "--trainer.callbacks.out_dir", str(dump))
    out = cli("fit", *shrunk(tmp_path, *DDP, *options, *callbacks))
    assert out.returncode == 0, out.stderr[-3000:]
    _assert_ranks_agree(dump, range(5))
    run, metrics = _metrics(tmp_path)
    assert out.stdout.count(f"Accuracy matrix ({metrics['primary_scorer']}, %)") == 1  # rank 0 reports
    assert metrics["method"] == method and len(metrics["tasks"]) == 5
    _assert_reported_equals_one_process(run, metrics, tmp_path, *options)
    return dump, metrics


@pytest.mark.parametrize("method", list(REHEARSAL))
def test_two_process_rehearsal_builds_the_same_memory_and_model_on_every_rank(tmp_path, monkeypatch, method):
    """Exemplar features are computed in shards and gathered: both ranks must select the same exemplars and
    class means. DER (with channel masks and pruning) also trains with frozen old extractors under DDP (no
    unused-parameter error), prunes the same channels on both ranks and balances its head."""
    dump, metrics = _two_process_stream(tmp_path, monkeypatch, method)
    assert metrics["primary_scorer"] == ("nme" if method == "ICaRL" else "cnn")
    for task in range(5):
        rank0 = json.loads((dump / f"rank0_task{task}.json").read_text())
        assert sum(len(v) for v in rank0["memory"].values()) == 50
        if method == "ICaRL":
            assert len(rank0["class_means"]) == 2 * (task + 1)
        if method == "DER":  # the masks were learned, binarised and applied at every task end
            assert len(rank0["pruning"]) == task + 1 and all(0 < f <= 1 for f in rank0["pruning"])


@pytest.mark.slow
@pytest.mark.parametrize("method", [name for name in METHODS if name not in REHEARSAL])
def test_every_method_runs_a_two_process_stream_with_identical_ranks(tmp_path, monkeypatch, method):
    """EWC reduces its Fisher over the ranks' shards, BiC trains its bias layer on gathered features, WA aligns the
    same weights, PackNet prunes by magnitude between its two fits: after every task both ranks must hold the same model
    and method state, and the reported accuracy must be what one process measures on the saved checkpoint."""
    _two_process_stream(tmp_path, monkeypatch, method)


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_on_one_process_and_back(tmp_path, monkeypatch):
    """Killed in task 2 under 2 processes, resumed from its mid-task last.ckpt on 1 process; that run's task-end
    checkpoint of task 3 then resumes under 2 processes. Loader shards follow the process count of the fit."""
    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests"))
    killed = tmp_path / "killed"
    out = cli("fit", *shrunk(killed, *DDP, *_crash(tmp_path, epoch=5, rank=0, hard=False)))
    assert out.returncode != 0 and "simulated crash at the start of epoch 5" in out.stderr, out.stderr[-3000:]
    (checkpoints,) = killed.glob("quickstart/version_*/checkpoints")  # rank 0 alone writes them
    names = {path.name for path in checkpoints.iterdir()}
    assert {"task00.ckpt", "task01.ckpt", "last.ckpt"} <= names and "task02.ckpt" not in names, names
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["callbacks"]["TaskStream"]["completed_task"] == 1 and last["lightning_cil"]["task_index"] == 2
    before = _metrics(killed)[1]["scorers"]["cnn"]["accuracy_matrix"]

    one = tmp_path / "one_process"
    out = cli("fit", *shrunk(one, "--ckpt_path", str(checkpoints / "last.ckpt")))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming at task 2" in out.stdout, out.stdout[-2000:]
    run, metrics = _metrics(one)
    matrix = metrics["scorers"]["cnn"]["accuracy_matrix"]
    assert matrix[:2] == before[:2] and _full(matrix)

    two = tmp_path / "two_processes"
    out = cli("fit", *shrunk(two, *DDP, "--ckpt_path", str(run / "checkpoints" / "task03.ckpt")))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming at task 3" in out.stdout, out.stdout[-2000:]
    final = _metrics(two)[1]["scorers"]["cnn"]["accuracy_matrix"]
    assert final[:4] == matrix[:4] and _full(final)


@pytest.mark.slow
def test_a_sigterm_under_two_processes_saves_its_step_and_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    """SIGTERM to rank 0 inside task 2 (Lightning passes it to rank 1): both ranks stop after the same step, the
    stream writes last.ckpt there, in the middle of an epoch, and exits 143. The resumed 2-process run (each rank
    continues its own shard of the stateful loader) ends with the uninterrupted run's matrix and weights."""
    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests"))
    reference = tmp_path / "reference"
    assert cli("fit", *shrunk(reference, *DDP)).returncode == 0
    stopped = tmp_path / "stopped"
    marker = ("--trainer.callbacks.marker", str(tmp_path / "sigterm.txt"))
    sigterm = ("--trainer.callbacks+=crash_once.SigtermOnce", "--trainer.callbacks.step", "7", *marker)
    out = cli("fit", *shrunk(stopped, *DDP, *sigterm))
    assert out.returncode == 128 + signal.SIGTERM, out.stderr[-3000:]
    (checkpoints,) = stopped.glob("quickstart/version_*/checkpoints")
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    done = last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"]
    assert last["global_step"] > 7 and 0 < done < 3, "stopped after a step inside an epoch (3 steps each)"
    out = cli("fit", *shrunk(stopped, *DDP, "--ckpt_path", "last"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming at task 1" in out.stdout, out.stdout[-2000:]
    expected = _metrics(reference)[1]["scorers"]["cnn"]["accuracy_matrix"]
    run, metrics = _metrics(stopped, newest=True)
    assert metrics["scorers"]["cnn"]["accuracy_matrix"] == expected
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    (reference_run,) = reference.glob("quickstart/version_*/checkpoints")
    wanted = torch.load(reference_run / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    for name, value in wanted.items():
        assert torch.equal(value, final[name]), name


@pytest.mark.slow
def test_a_worker_killed_under_torchrun_is_restarted_and_resumes_from_the_last_checkpoint(tmp_path):
    """torchrun restarts the whole job with the same command line; `--ckpt_path last` finds the newest last.ckpt of
    the run (written into version_0 by the first launch; the restart logs into version_1) and goes on from there."""
    log = tmp_path / "torchrun.log"
    job = _torchrun(
        "--standalone",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        "1",
        "-m",
        "lightning_cil",
        "fit",
        *shrunk(tmp_path, *DDP, *_crash(tmp_path, epoch=5, rank=1, hard=True), "--ckpt_path", "last"),
        log=log,
        # without it the restarted workers read the first attempt's addresses from torchrun's shared store and
        # cannot connect (pytorch/pytorch#135712)
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
    )
    (returncode,) = _wait([job])
    output = log.read_text()
    assert returncode == 0, output[-4000:]
    assert (tmp_path / "crashed.txt").is_file()  # rank 1 died in task 2 ...
    assert "ckpt_path='last': no checkpoint of this run yet" in output  # ... of the first launch, which started fresh
    assert "resuming at task 2" in output, output[-4000:]  # the restart went on from task 2, not from task 0
    run, metrics = _metrics(tmp_path, newest=True)
    assert run.name == "version_1" and [t["task"] for t in metrics["tasks"]] == [0, 1, 2, 3, 4]
    assert _full(metrics["scorers"]["cnn"]["accuracy_matrix"])
    _assert_reported_equals_one_process(run, metrics, tmp_path)


@pytest.mark.slow
def test_two_nodes_over_loopback_run_the_stream_once(tmp_path):
    """Two torchrun "nodes" of one process each on this machine: global rank 0 alone writes the run."""
    port = str(_free_port())
    options = ("--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp")
    nodes = [
        _torchrun(
            *("--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1"),
            *("--master_addr", "127.0.0.1", "--master_port", port),
            *("-m", "lightning_cil", "fit", *shrunk(tmp_path, *options, "--trainer.accelerator", "cpu")),
            log=tmp_path / f"node{rank}.log",
        )
        for rank in (0, 1)
    ]
    returncodes = _wait(nodes)
    outputs = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert returncodes == [0, 0], [text[-3000:] for text in outputs]
    assert [text.count("Accuracy matrix (cnn, %)") for text in outputs] == [1, 0]
    run, metrics = _metrics(tmp_path)  # one run folder, one metrics.json
    assert len(metrics["tasks"]) == 5 and _full(metrics["scorers"]["cnn"]["accuracy_matrix"])
    assert len(list(tmp_path.glob("quickstart/version_*/checkpoints/task04.ckpt"))) == 1
    _assert_reported_equals_one_process(run, metrics, tmp_path)


def test_slurm_example_passes_a_valid_configuration(tmp_path):
    """docker/slurm_der_imagenet100.sbatch under a stand-in `srun` that prints the configuration it would run."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@" --print_config\n')
    (fake / "srun").chmod(0o755)
    slurm = {"SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_NTASKS": "16"}
    env = {**os.environ, **slurm, "SLURM_NTASKS_PER_NODE": "8", "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    script = REPO / "docker" / "slurm_der_imagenet100.sbatch"
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    for expected in (
        "class_path: lightning_cil.methods.DER",
        "num_nodes: 2",
        "devices: '8'",
        "batch_size: 16",  # 256 over 16 processes
        "version: 4242",  # CSVLogger then logs into version_4242/
        "class_path: lightning.fabric.plugins.environments.SLURMEnvironment",
        "auto_requeue: false",
        "ckpt_path: last",
    ):
        assert expected in out.stdout, expected
