"""The run directory that `train --out` writes (ckpt-<step>/ checkpoints, `latest`, best/,
loss.png): never replace someone's checkpoint unless asked, and know where a resumed run saves.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .checkpoint import (
    _CKPT_DIR,
    CHECKPOINT_FILES,
    LATEST_FILE,
    MODEL_FILE,
    _step_of,
    is_run_dir,
    list_checkpoints,
    remove_leftovers,
)
from .errors import GPT2Error

BEST_DIR = "best"   # --keep-best: the best validation checkpoint, beside the numbered ones


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to replace someone's checkpoint (checked before training, not after hours of it)."""
    if out.exists() and not out.is_dir():
        raise GPT2Error(f"--out {out} exists and is not a directory; choose another --out")
    ours = [p.name for p in list_checkpoints(out)][-3:]
    ours += [n for n in (*CHECKPOINT_FILES, LATEST_FILE, BEST_DIR, "loss.png") if (out / n).exists()]
    if ours and not overwrite:
        resume = f"continue it with --resume {out}, " if is_run_dir(out) else ""
        raise GPT2Error(f"--out {out} already holds a checkpoint ({', '.join(ours)}); {resume}choose another "
                        "--out, or pass --overwrite to replace it")


def clear_out_dir(out: Path) -> None:
    """--overwrite: remove the previous run's checkpoints from `out` (nothing else)."""
    if not out.is_dir():
        return
    for n in (LATEST_FILE, *CHECKPOINT_FILES, "loss.png"):   # `latest` first: nothing points at a
        (out / n).unlink(missing_ok=True)                     # half-deleted checkpoint
    for ckpt in list_checkpoints(out):
        shutil.rmtree(ckpt)
    if (out / BEST_DIR / MODEL_FILE).is_file():   # only a checkpoint of ours
        shutil.rmtree(out / BEST_DIR)
    remove_leftovers(out)


def run_dir_of(ckpt_dir: Path) -> Path:
    """Where a resumed run saves: the run directory a ckpt-<step> checkpoint belongs to, or a
    single checkpoint directory itself (its new checkpoints go inside it, and `latest` wins)."""
    return ckpt_dir.parent if _CKPT_DIR.fullmatch(ckpt_dir.name) else ckpt_dir


def check_resume_out(out: Path, ckpt_dir: Path, step: int) -> None:
    """A run resumed from step `step` of `ckpt_dir` saves into `out`: a new directory must hold
    no checkpoint, the run's own directory none later than that step."""
    if out.resolve() != run_dir_of(ckpt_dir).resolve():
        check_out_dir(out, overwrite=False)    # a new run directory, continuing from ckpt_dir
        return
    later = [c for c in list_checkpoints(out) if _step_of(c) > step]
    if later:
        raise GPT2Error(f"{out} has a checkpoint after step {step} ({later[-1].name}); resume from that one "
                        f"(--resume {later[-1]}), or continue step {step} in a new directory (--out NEW)")

