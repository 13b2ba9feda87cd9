"""The ``lightning-cil`` command: ``report`` reads run files; everything else is ``LightningCILCLI``
(``lightning_cli.py``, imported only then), whose ``fit`` runs a whole task stream.

lightning-cil fit --config configs/quickstart.yaml
lightning-cil fit --config configs/finetune_cifar10.yaml --model.init_args.schedule.epochs 2
lightning-cil fit --config configs/quickstart.yaml --ckpt_path last   # resume the run's newest last.ckpt, if any
lightning-cil test --config configs/quickstart.yaml --ckpt_path <run>/checkpoints/last.ckpt
lightning-cil report <run> [<run> ...] --out <folder>
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

__all__ = ["main"]


def _is_configuration_error(error: BaseException) -> bool:
    """A ValueError/FileNotFoundError raised by lightning_cil's own checks (not from deep inside a library)."""
    if not isinstance(error, (ValueError, FileNotFoundError)):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"{os.sep}lightning_cil{os.sep}" in frames[-1].filename


def main(args: Any = None) -> None:
    """Console entry point. Configuration errors print one line, not a traceback
    (set LIGHTNING_CIL_TRACEBACK=1 to see it). ``report`` is answered here, without building a LightningCLI."""
    argv = sys.argv[1:] if args is None else args
    try:
        if isinstance(argv, (list, tuple)) and argv[:1] == ["report"]:
            from lightning_cil import report  # reads run files only: no torch, no Lightning

            report.main(argv[1:])
        else:
            from lightning_cil.lightning_cli import LightningCILCLI

            LightningCILCLI(args=args)
    except Exception as error:
        if not _is_configuration_error(error) or os.environ.get("LIGHTNING_CIL_TRACEBACK"):
            raise
        print(f"lightning-cil: error: {error}", file=sys.stderr)
        sys.exit(2)


def __getattr__(name: str) -> Any:
    """``LightningCILCLI`` and ``DEFAULT_SEED`` import Lightning: loaded on first use, not by ``main``."""
    if name in ("LightningCILCLI", "DEFAULT_SEED"):
        from lightning_cil import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
