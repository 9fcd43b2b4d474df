"""What the command-line modules share: the program's name in messages, checks of flag values
(one clear message each, raised as GPT2Error) and an error as the one line the CLI prints
(`error: ...`, exit code 2).
"""

from __future__ import annotations

import math
import os

import minigrad as mg

from ..errors import GPT2Error

PROG = "python -m gpt2"


def flag_name(key: str) -> str:
    """The flag an argparse destination comes from: "max_steps" -> "--max-steps"."""
    return "--" + key.replace("_", "-")


def require_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise GPT2Error(f"{name} must be a positive integer, got {value}")


def require_finite(name: str, value) -> None:
    if value is not None and not math.isfinite(value):
        raise GPT2Error(f"{name} must be a finite number, got {value}")


def use_backend(name: str) -> None:
    mg.set_backend(name)   # BackendError (unknown name, CuPy missing, no GPU) -> error line


def one_line(exc: BaseException) -> str:
    """An error's message on one line (a message may wrap), or its type if it has none."""
    return " ".join(str(exc).split()) or type(exc).__name__


def version() -> str:
    """This package's version, as installed (pyproject.toml's), or "unknown" when run from a
    checkout that was never installed."""
    from importlib.metadata import PackageNotFoundError  # noqa: PLC0415
    from importlib.metadata import version as _version  # noqa: PLC0415

    try:
        return _version("minigrad-gpt2")
    except PackageNotFoundError:
        return "unknown"


def default_backend() -> str:
    """The --backend a command uses when none is given: $MINIGRAD_BACKEND if it names one
    (a bad value is reported by cli.main before the command runs), else numpy."""
    value = os.environ.get("MINIGRAD_BACKEND", "")
    return value if value in ("numpy", "cupy") else "numpy"
