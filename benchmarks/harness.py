"""What the benchmark scripts share: the machine a number was measured on, the fit they launch, the JSON they write.

Every CPU number is only meaningful with its thread and loader settings, so every result records the same
machine fields (cores, torch threads, OMP settings, load, device, versions, date).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    """The machine and thread settings this process runs with (call it after any `torch.set_num_threads`)."""
    import lightning as L
    import torch

    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        **_cuda(torch),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def _cuda(torch) -> dict[str, Any]:
    """The GPU side of the record: driver, CUDA and cuDNN versions, memory (None where there is no GPU)."""
    if not torch.cuda.is_available():
        return {"gpu_count": 0, "cuda": torch.version.cuda, "driver": None}
    props = torch.cuda.get_device_properties(0)
    try:  # the driver version is not in torch's API; nvidia-smi ships with the driver
        driver = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            .stdout.split("\n")[0]
            .strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        driver = None
    return {
        "gpu_count": torch.cuda.device_count(),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "compute_capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "driver": driver,
    }


def fit_command(config: str) -> list[str]:
    """`lightning-cil fit --config configs/<config>` in a fresh interpreter (append overrides to it)."""
    return [sys.executable, "-m", "lightning_cil.cli", "fit", "--config", str(REPO / "configs" / config)]


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    """Write a benchmark's result as JSON (creating its folder) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


def speed_callbacks(channels_last: bool, compile_backbone: bool) -> list:
    """The opt-in speed callbacks a benchmark was asked for (``--channels-last``, ``--compile``)."""
    from lightning_cil.callbacks import ChannelsLast, CompileBackbone

    return [ChannelsLast()] * channels_last + [CompileBackbone()] * compile_backbone
