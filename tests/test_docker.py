"""The container image (`docker/Dockerfile`) and the multi-node launch script (`docker/launch_multinode.sh`).

The image check is `slow` and needs buildah (`apt-get install buildah`), root, and about 4.5 times the size of the
copied Python distributions free in the temporary directory. It pulls nothing: the base image is made from the Python
installation running the tests (the interpreter, the installed distributions lightning-cil requires, and the system
libraries they link), standing in for the CUDA PyTorch image of a real build. buildah's storage (vfs) and its
temporary files live in one temporary directory, removed at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
import torch
from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LAUNCH = REPO / "docker" / "launch_multinode.sh"
BASE_TAG = "localhost/lightning-cil-test-base"
IMAGE_TAG = "localhost/lightning-cil-test"
# Programs the Dockerfile's RUN line calls (through /bin/sh) besides python.
TOOLS = ("grep", "rm")


# --- launch_multinode.sh (a fake torchrun prints the command line it gets) ---


def _launch(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "torchrun"
    fake.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    fake.chmod(0o755)
    layout = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "TORCHRUN_ARGS")
    clean = {k: v for k, v in os.environ.items() if k not in layout}
    full_env = {**clean, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.run(["bash", str(LAUNCH), *args], capture_output=True, text=True, env=full_env, timeout=60)


NODE = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "NPROC_PER_NODE": "4"}


def test_launch_passes_the_node_layout_to_torchrun_and_lightning(tmp_path: Path) -> None:
    assert os.access(LAUNCH, os.X_OK)  # the image's users run it as an entry point
    out = _launch(tmp_path, "--config", "configs/quickstart.yaml", **NODE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:-1] == [
        *("--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "4"),
        *("--master_addr", "10.0.0.1", "--master_port", "29500"),
        *("-m", "lightning_cil", "fit", "--trainer.strategy", "ddp", "--config", "configs/quickstart.yaml"),
        *("--trainer.num_nodes", "2", "--trainer.devices", "4"),
    ]


def test_launch_keeps_the_users_trainer_arguments(tmp_path: Path) -> None:
    out = _launch(
        tmp_path, "--trainer.devices=2", "--trainer.strategy", "fsdp", **NODE, TORCHRUN_ARGS="--max-restarts 3"
    )
    assert out.returncode == 0, out.stderr
    argv = out.stdout.split("\n")[:-1]
    assert argv[argv.index("--master_port") + 2 : argv.index("-m")] == ["--max-restarts", "3"]
    assert argv[argv.index("fit") + 1 :] == [
        *("--trainer.strategy", "ddp", "--trainer.devices=2", "--trainer.strategy", "fsdp"),
        *("--trainer.num_nodes", "2"),
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"MASTER_ADDR": ""}, "MASTER_ADDR is not set"),
        ({"NODE_RANK": "2"}, "NODE_RANK must be in 0 .. 1"),
        ({"NNODES": "two"}, "NNODES must be a non-negative integer"),
    ],
)
def test_launch_refuses_an_incomplete_layout(tmp_path: Path, change: dict[str, str], message: str) -> None:
    out = _launch(tmp_path, **{**NODE, **change})
    assert out.returncode == 2
    assert message in out.stderr
    assert out.stdout == ""


# --- the image, built and run with buildah ---


def _closure(name: str) -> list[metadata.Distribution]:
    """The installed distributions that `name` requires, transitively (extras included), without `name` itself."""
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(name, frozenset[str]())]
    while todo:
        dist_name, extras = todo.pop()
        key = canonicalize_name(dist_name)
        if (key, extras) in seen:
            continue
        seen.add((key, extras))
        try:
            dist = found.setdefault(key, metadata.distribution(dist_name))
        except metadata.PackageNotFoundError:
            continue  # pip will say so in the build
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
                todo.append((req.name, frozenset(req.extras)))
    found.pop(canonicalize_name(name))
    return list(found.values())


def _with_link_targets(path: str) -> Iterator[str]:
    """`path` and, if it is a symbolic link, the chain of paths it points to."""
    path = os.path.normpath(path)
    while os.path.islink(path):
        yield path
        path = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
    yield path


def _base_files() -> list[str]:
    """Absolute paths of everything the stand-in base image needs."""
    site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    # The Dockerfile runs `python`; pytest's interpreter may be the environment's `python3` link.
    bin_dir = os.path.dirname(sys.executable)
    files = {sys.executable, *(os.path.join(bin_dir, name) for name in ("python", "python3"))}
    for top, dirs, names in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = [d for d in dirs if os.path.join(top, d) not in site]
        files.update(os.path.join(top, n) for n in names)
    if sys.prefix != sys.base_prefix:  # a virtual environment
        files.add(os.path.join(sys.prefix, "pyvenv.cfg"))
    for dist in [*_closure("lightning-cil"), *(metadata.distribution(n) for n in ("pip", "setuptools"))]:
        files.update(str(dist.locate_file(f)) for f in dist.files or [])
    files.update(["/bin/sh", *(shutil.which(tool) for tool in TOOLS)])
    files = {f for path in files if os.path.lexists(path) for f in _with_link_targets(path)}
    # The shared libraries all of it links, wherever they live (system, interpreter, other wheels).
    elf = sorted(f for f in files if os.path.isfile(f) and (re.search(r"\.so(\.|$)", f) or os.access(f, os.X_OK)))
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    for i in range(0, len(elf), 100):
        out = subprocess.run(["ldd", *elf[i : i + 100]], capture_output=True, text=True, env=env).stdout
        for lib in re.findall(r"^\s+(?:\S+ => )?(/\S+) \(0x", out, re.M):
            files.update(_with_link_targets(lib))
    return sorted(files)


class _Buildah:
    """buildah with its vfs storage and temporary files inside `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "tmp").mkdir()
        self.env = {**os.environ, "TMPDIR": str(root / "tmp")}

    def __call__(self, *args: str, check: bool = True, timeout: int = 1800) -> str:
        storage = ["--root", str(self.root / "storage"), "--runroot", str(self.root / "run"), "--storage-driver", "vfs"]
        out = subprocess.run(
            ["buildah", *storage, *args], capture_output=True, text=True, env=self.env, timeout=timeout
        )
        failed = f"buildah {' '.join(args)} failed:\n{out.stdout[-6000:]}\n{out.stderr[-6000:]}"
        assert out.returncode == 0 or not check, failed
        return out.stdout


def _build_base(buildah: _Buildah, files: list[str]) -> None:
    """Commit `files` (with the host's paths) plus a minimal /etc, /tmp and /root as the image BASE_TAG."""
    container = buildah("from", "scratch").strip()
    rootfs = Path(buildah("mount", container).strip())
    listing = buildah.root / "files.txt"
    listing.write_text("".join(f.lstrip("/") + "\0" for f in files))
    pack = subprocess.Popen(
        ["tar", "-C", "/", "--no-recursion", "--null", "-T", str(listing), "-cf", "-"], stdout=subprocess.PIPE
    )
    unpack = subprocess.run(["tar", "-C", str(rootfs), "-xf", "-"], stdin=pack.stdout, capture_output=True)
    pack.stdout.close()
    assert pack.wait() == 0 and unpack.returncode == 0, unpack.stderr.decode()
    (rootfs / "etc").mkdir(exist_ok=True)
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")
    (rootfs / "root").mkdir(exist_ok=True)
    (rootfs / "tmp").mkdir(mode=0o1777, exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)
    path = f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin"
    buildah("config", "--env", f"PATH={path}", "--env", "HOME=/root", container)
    buildah("commit", "--rm", container, BASE_TAG)


@pytest.mark.slow
def test_image_builds_on_the_local_torch_and_runs_the_quickstart() -> None:
    if shutil.which("buildah") is None:
        pytest.skip("buildah is not installed (apt-get install buildah)")
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("the buildah check needs Linux and root (it mounts the base image's container)")
    files = _base_files()
    size = sum(os.path.getsize(f) for f in files if os.path.isfile(f) and not os.path.islink(f))
    tmp = tempfile.gettempdir()
    if shutil.disk_usage(tmp).free < 4.5 * size:
        pytest.skip(f"the buildah check needs {4.5 * size / 1e9:.0f} GB free in {tmp} (vfs stores full copies)")

    with tempfile.TemporaryDirectory(prefix="lightning-cil-buildah-", ignore_cleanup_errors=True) as root:
        buildah = _Buildah(Path(root))
        try:
            _build_base(buildah, files)
            # --no-index: everything must come from the base; pip may neither fetch nor replace torch.
            buildah(
                "bud", "--isolation", "chroot", "--layers=false", "-f", str(REPO / "docker" / "Dockerfile"),
                "--build-arg", f"BASE_IMAGE={BASE_TAG}",
                "--build-arg", "PIP_INSTALL_ARGS=--no-index --no-build-isolation",
                "-t", IMAGE_TAG, str(REPO),
            )  # fmt: skip
            config = json.loads(buildah("inspect", "--type", "image", IMAGE_TAG))["OCIv1"]["config"]
            assert config["Entrypoint"] == ["lightning-cil"]
            assert "OMP_WAIT_POLICY=PASSIVE" in config["Env"]

            container = buildah("from", IMAGE_TAG).strip()
            run = ("run", "--isolation", "chroot", container, "--")
            probe = "import os, torch; print(torch.__version__, os.access('docker/launch_multinode.sh', os.X_OK))"
            assert buildah(*run, "python", "-c", probe).split() == [torch.__version__, "True"]
            out = buildah(
                *run, "lightning-cil", "fit", "--config", "configs/quickstart.yaml",
                "--model.init_args.schedule", "{epochs: 1, lr: 0.02, milestones: []}",
                "--trainer.enable_progress_bar", "false",
            )  # fmt: skip
            assert "Accuracy matrix" in out, out[-3000:]
            assert re.search(r"average incremental accuracy: \d+\.\d+%", out), out[-3000:]
        finally:
            buildah("rm", "--all", check=False)
