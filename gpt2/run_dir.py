"""A training run's directory, written crash-safely as the run goes:

    runs/verdict/
      ckpt-000100/             one checkpoint directory (gpt2/checkpoint.py), per save (the last --keep kept)
      ckpt-000200/
      latest                   the name of the newest complete checkpoint ("ckpt-000200")
      best/                    with --keep-best: the lowest validation loss so far
      loss.png

`save_run_checkpoint` builds each checkpoint in a hidden temporary directory, renames it into
place only once every file is on disk, and only then moves `latest`; a `kill -9` at any moment
leaves `latest` naming a complete checkpoint. Reading one back (the newest complete checkpoint of
a run directory) is gpt2/checkpoint.py's `resolve_checkpoint`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from . import safeio
from .checkpoint import LATEST_FILE, checkpoint_name, list_checkpoints, save_checkpoint
from .errors import GPT2Error


def _discard(path: Path) -> None:
    """Delete a checkpoint directory: first renamed to a hidden name, so that a crash half-way
    through never leaves something that looks like a checkpoint."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.time_ns()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(run_dir) -> None:
    """Delete what a killed save or prune left behind (.tmp-ckpt-* and .trash-ckpt-* folders)."""
    for p in Path(run_dir).glob(".tmp-ckpt-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(run_dir).glob(".trash-ckpt-*"):
        shutil.rmtree(p, ignore_errors=True)


def save_run_checkpoint(run_dir, model, optimizer=None, state=None, *, step: int,
                        keep: int | None = None, tokenizer=None, name: str | None = None) -> Path:
    """Save checkpoint `run_dir/ckpt-<step>/` crash-safely and point `run_dir/latest` at it.

    1. Every file is written (and fsynced) into a hidden `.tmp-ckpt-<step>-*` directory.
    2. That directory is renamed to `ckpt-<step>` in one step, and the run directory fsynced.
    3. `latest` is rewritten atomically to name it.
    4. With `keep`, all but the newest `keep` checkpoints are deleted.
    A crash or `kill -9` at any moment leaves `latest` naming a complete checkpoint. Saving a
    step that already has a checkpoint replaces it. Returns the checkpoint directory.
    `name` saves as `run_dir/<name>` instead (e.g. "best"), the same way, leaving `latest` and
    the numbered checkpoints alone.
    """
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
        raise GPT2Error(f"step must be an integer >= 0, got {step!r}")
    if keep is not None and (not isinstance(keep, (int, np.integer)) or isinstance(keep, bool) or keep < 1):
        raise GPT2Error(f"keep must be a positive integer, got {keep!r}")
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise GPT2Error(f"run directory {run_dir} exists and is not a directory; choose another path")
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(run_dir)
    special = name is not None
    name = name if special else checkpoint_name(int(step))
    final = run_dir / name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=run_dir))
    try:
        os.chmod(tmp, safeio.default_mode(directory=True))
        save_checkpoint(tmp, model, optimizer, state, tokenizer=tokenizer)
        safeio.fsync_dir(tmp)
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
        safeio.fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if special:
        return final
    safeio.write_text(run_dir / LATEST_FILE, name + "\n")
    if keep is not None:
        for old in list_checkpoints(run_dir)[:-int(keep)]:
            if old != final:
                _discard(old)
    return final

