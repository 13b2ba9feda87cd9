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
import re
import sys
import traceback
from argparse import ArgumentError
from typing import Any

from lightning_cil.quiet import silence_meaningless_notices

__all__ = ["main"]


def _is_configuration_error(error: BaseException) -> bool:
    """A ValueError/FileNotFoundError raised by lightning_cil's own checks (not from deep inside a library), or
    an unreadable dataset file (re-raised by torch's DataLoader when a loader worker read it)."""
    from lightning_cil.data.datasets import DatasetError  # loaded with the stream, never for `report`

    if isinstance(error, DatasetError):
        return True
    if not isinstance(error, (ValueError, FileNotFoundError)):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"{os.sep}lightning_cil{os.sep}" in frames[-1].filename


def _raised_in_jsonargparse(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return isinstance(error, ArgumentError) or (bool(frames) and f"{os.sep}jsonargparse{os.sep}" in frames[-1].filename)


def _configuration_error(error: BaseException) -> BaseException | None:
    """The lightning_cil check behind ``error``: the error itself, or the one that jsonargparse wrapped while
    instantiating a typed argument (its "Does not validate against any of the Union subtypes" message)."""
    while error is not None:
        if _is_configuration_error(error):
            return error
        if not _raised_in_jsonargparse(error):
            return None
        error = error.__cause__
    return None


def _method_names() -> list[str]:
    from lightning_cil import methods
    from lightning_cil.methods import IncrementalModule

    return [
        name
        for name in methods.__all__
        if isinstance(getattr(methods, name), type)
        and issubclass(getattr(methods, name), IncrementalModule)
        and getattr(methods, name) is not IncrementalModule
    ]


def _unknown_method(error: ArgumentError) -> str | None:
    """The one-line message for a ``model.class_path`` that names no method (None for other parse errors)."""
    if not str(error).startswith('Parser key "model"'):
        return None
    union: BaseException | None = error
    while union is not None and not str(union).startswith("Does not validate against any of the Union subtypes"):
        union = union.__cause__
    # the Union error's cause is the error of its first subtype, IncrementalModule: the model's own class_path
    cause = union.__cause__ if union is not None else None
    text = str(cause)
    if given := re.match(r"Problem with given class_path '([^']*)':", text):
        if not isinstance(cause.__cause__, (ImportError, AttributeError)):
            return None
        reason = f"it cannot be imported ({cause.__cause__})"
    elif given := re.match(r"(?:Expected a dot import path string|Unexpected import path format): (.*)", text):
        reason = "it is not a method name or import path"
    elif given := re.match(r"Import path (\S+) does not correspond to a subclass", text):
        reason = "it is not an IncrementalModule subclass"
    else:
        return None
    names = _method_names()
    return (
        f"model.class_path={given.group(1)!r} is not a method: {reason}. Available methods: {', '.join(names)} "
        f"(e.g. lightning_cil.methods.{names[0]}), or the import path of your own IncrementalModule subclass."
    )


_PROBLEM = re.compile(r"Problem with given class_path '([^']*)':\n\s*(.+)")
_KEY = re.compile(r'Parser key "([^"]+)"')


def _class_path_problem(error: ArgumentError) -> str | None:
    """One line for a ``class_path`` (a dataset, backbone, transform, ...) that cannot be imported or built: the
    innermost such problem in jsonargparse's nested Union report, with the key it was given for."""
    text = str(error)
    leaves = [m for m in _PROBLEM.finditer(text) if not m.group(2).startswith(("Parser key", "Does not validate"))]
    if not leaves:
        return None
    problem = leaves[-1]
    keys = _KEY.findall(text[: problem.start()])
    if not keys:
        return None
    key = keys[0] + "".join(f".init_args.{k}" if keys[0] == "model" else f".{k}" for k in keys[1:])
    return _memory_of_rehearsal_free(problem.group(1), problem.group(2)) or (
        f"{key}: class_path {problem.group(1)!r} cannot be used: {problem.group(2).strip()}."
    )


def _memory_of_rehearsal_free(class_path: str, problem: str) -> str | None:
    """The refusal of a memory setting given to a rehearsal-free method (its protocol card says so)."""
    option = re.match(r"Option '(memory_budget|memory_per_class|selection)' is not accepted", problem)
    if option is None:
        return None
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        method = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    if not getattr(method, "rehearsal_free", False):
        return None
    return (
        f"{name} is rehearsal-free: its paper's protocol keeps no exemplars, so model.init_args.{option.group(1)} is "
        f"refused (a rehearsal method such as lightning_cil.methods.ICaRL keeps a memory)."
    )


_BUILT = re.compile(r"Given value: Namespace\(class_path='([^']*)'")


def _instantiation_problem(error: BaseException) -> str | None:
    """One line for an object given by ``class_path`` (a dataset, a backbone, ...) whose constructor raised:
    jsonargparse reports it as a Union mismatch, with the constructor's error among the subtypes' errors."""
    text = str(error)
    if not _raised_in_jsonargparse(error) or not text.startswith("Does not validate against any of the Union"):
        return None
    reasons = [
        line.strip()[2:]
        for line in text.splitlines()
        if line.strip().startswith("- ") and not line.strip().startswith(("- Expected a <class", "- Problem with"))
    ]
    given = _BUILT.search(text)
    if not reasons or given is None:
        return None
    return f"class_path {given.group(1)!r} could not be built from its init_args: {reasons[-1]}"


def _diverged(error: BaseException) -> bool:
    from lightning_cil.stream import StreamDiverged  # the stream is loaded already when a run diverges

    return isinstance(error, StreamDiverged)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


#: jsonargparse raises parse errors instead of printing the whole usage, so that main() can word them
_RAISE_PARSE_ERRORS = {
    "exit_on_error": False,
    **{cmd: {"exit_on_error": False} for cmd in ("fit", "validate", "test", "predict")},
}


def main(args: Any = None) -> None:
    """Console entry point. Configuration errors print one line, not a traceback
    (set LIGHTNING_CIL_TRACEBACK=1 to see it). ``report`` is answered here, without building a LightningCLI."""
    argv = sys.argv[1:] if args is None else args
    silence_meaningless_notices()
    try:
        if isinstance(argv, (list, tuple)) and argv[:1] == ["report"]:
            from lightning_cil import report  # reads run files only: no torch, no Lightning

            report.main(argv[1:])
        else:
            from lightning_cil.lightning_cli import LightningCILCLI

            LightningCILCLI(args=args, parser_kwargs=_RAISE_PARSE_ERRORS)
    except RuntimeError as error:
        if not _diverged(error) or os.environ.get("LIGHTNING_CIL_TRACEBACK"):
            raise
        print(f"lightning-cil: error: {error}", file=sys.stderr)  # the run failed, not its configuration
        sys.exit(1)
    except ArgumentError as error:
        if os.environ.get("LIGHTNING_CIL_TRACEBACK"):
            raise
        found = _configuration_error(error)
        problem = None if found is not None else _class_path_problem(error)
        message = _unknown_method(error) or (_one_line(found) if found is not None else problem or str(error))
        print(f"lightning-cil: error: {message}", file=sys.stderr)
        if found is None and problem is None and not message.startswith("model.class_path="):
            subcommands = (["fit"], ["validate"], ["test"], ["predict"])
            command = f"{argv[0]} " if isinstance(argv, (list, tuple)) and argv[:1] in subcommands else ""
            print(f"For the accepted options run: lightning-cil {command}--help", file=sys.stderr)
        sys.exit(2)
    except Exception as error:
        found = _configuration_error(error)
        message = _one_line(found) if found is not None else _instantiation_problem(error)
        if message is None or os.environ.get("LIGHTNING_CIL_TRACEBACK"):
            raise
        print(f"lightning-cil: error: {message}", file=sys.stderr)
        sys.exit(2)


def __getattr__(name: str) -> Any:
    """``LightningCILCLI`` and ``DEFAULT_SEED`` import Lightning: loaded on first use, not by ``main``."""
    if name in ("LightningCILCLI", "DEFAULT_SEED"):
        from lightning_cil import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
