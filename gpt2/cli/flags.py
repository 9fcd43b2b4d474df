"""What the command-line modules share: the program's name in messages, the flags that mean the
same in several commands (`add_flag`: train's and finetune's training-loop and run-directory
flags, --backend), checks of flag values (one clear message each, raised as GPT2Error) and an
error as the one line the CLI prints (`error: ...`, exit code 2).
"""

from __future__ import annotations

import argparse
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


def check_optimizer_flags(args) -> None:
    """--lr > 0, --weight-decay >= 0, --grad-clip > 0 or none (train's and finetune's)."""
    if not args.lr > 0:
        raise GPT2Error(f"--lr must be > 0, got {args.lr}")
    if args.weight_decay < 0:
        raise GPT2Error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.grad_clip is not None and not args.grad_clip > 0:
        raise GPT2Error(f"--grad-clip must be > 0, got {args.grad_clip}")


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


# Flags that mean the same in every command that has them: (flag and aliases, type, metavar, help).
# Each command gives its own default (`add_flag`), and may add to the help.
SHARED_FLAGS = {
    "epochs": (("--epochs",), int, "N", "passes over the training data"),
    "max_steps": (("--max-steps", "--max-iters"), int, "N",
                  "stop after N optimizer steps (default: no limit)"),
    "batch_size": (("--batch-size",), int, "N", "examples per optimizer step"),
    "lr": (("--lr", "--learning-rate"), float, "X", "AdamW learning rate"),
    "weight_decay": (("--weight-decay",), float, "X", "AdamW decoupled weight decay"),
    "grad_clip": (("--grad-clip",), float, "X", "clip the global gradient norm to X (default: no clipping)"),
    "eval_every": (("--eval-every", "--eval-interval"), int, "N",
                   "print train and val loss every N steps (the log's Step 0 is the first step, as the "
                   "book counts; checkpoint ckpt-N holds the weights after N steps)"),
    "eval_iter": (("--eval-iter", "--eval-iters"), int, "N",
                  "batches of each loader averaged per evaluation"),
    "seed": (("--seed",), int, "N", "seed for weights, dropout and the shuffle order"),
    "backend": (("--backend",), None, None,
                "numpy (CPU) or cupy (NVIDIA GPU) (default: $MINIGRAD_BACKEND, else numpy)"),
    "out": (("--out",), str, "DIR",
            "run directory for the checkpoints (ckpt-<step>/, `latest`) and loss.png"),
    "overwrite": (("--overwrite",), bool, None,
                  "replace a checkpoint already in --out (otherwise that is an error)"),
    "no_progress": (("--no-progress",), bool, None, "no progress bar"),
    "resume": (("--resume",), str, "DIR",
               "continue the run saved in DIR (a run directory: its `latest` checkpoint; or one "
               "ckpt-<step> directory) exactly where it stopped, with its settings"),
    "save_every": (("--save-every",), int, "N",
                   "save a checkpoint every N steps (and always at the end and on Ctrl-C)"),
    "keep": (("--keep",), int, "N", "keep the newest N checkpoints in --out, deleting older ones"),
}
_NO_DEFAULT = object()


class StrictParser(argparse.ArgumentParser):
    """A command's flags alone, raising ValueError on a bad value instead of printing and exiting
    (for reading back a resumed run's saved settings)."""

    def error(self, message):
        raise ValueError(message)


def add_flag(group, key: str, default=_NO_DEFAULT, help: str | None = None, extra: str = ""):  # noqa: A002
    """Add the shared flag `key` (SHARED_FLAGS) to a parser or group, with this command's default;
    `help` replaces its help text, `extra` is added to it. --backend defaults to
    default_backend(); on/off flags to off."""
    names, kind, metavar, text = SHARED_FLAGS[key]
    text = (help or text) + ((" " if extra[:1] not in ";," else "") + extra if extra else "")
    if key == "backend":
        return group.add_argument(*names, choices=["numpy", "cupy"],
                                  default=default_backend() if default is _NO_DEFAULT else default, help=text)
    if kind is bool:
        return group.add_argument(*names, action="store_true", help=text)
    return group.add_argument(*names, type=kind, metavar=metavar,
                              default=None if default is _NO_DEFAULT else default, help=text)
