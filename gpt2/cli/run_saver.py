"""The run directory that `train --out` writes (ckpt-<step>/ checkpoints, `latest`, best/,
loss.png): before training, never replace someone's checkpoint unless asked and know where a
resumed run saves; during training, RunSaver writes the checkpoints.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import minigrad as mg

from ..checkpoint import (
    CHECKPOINT_FILES,
    LATEST_FILE,
    MODEL_FILE,
    checkpoint_name,
    checkpoint_step,
    is_run_dir,
    latest_checkpoint,
    list_checkpoints,
    update_trainer_state,
)
from ..errors import GPT2Error
from ..run_dir import remove_leftovers, save_run_checkpoint

BEST_DIR = "best"   # --keep-best: the best validation checkpoint, beside the numbered ones


def check_best_dir(out: Path) -> None:
    """--keep-best writes out/best: refuse if something there is not a checkpoint of ours."""
    best = out / BEST_DIR
    if (best.exists() or best.is_symlink()) and not (best.is_dir() and not best.is_symlink()
                                                      and (best / MODEL_FILE).is_file()):
        raise GPT2Error(f"{best} exists and is not a checkpoint written by --keep-best, which would replace "
                        "it; move it away, choose another --out, or leave out --keep-best")


def check_out_dir(out: Path, overwrite: bool, keep_best: bool = False, outputs=()) -> None:
    """Refuse to replace someone's checkpoint (checked before training, not after hours of it).
    `outputs`: the other files the command writes at the top of `out` (beside loss.png)."""
    if out.exists() and not out.is_dir():
        raise GPT2Error(f"--out {out} exists and is not a directory; choose another --out")
    if keep_best:
        check_best_dir(out)
    ours = [p.name for p in list_checkpoints(out)][-3:]
    single = (out / MODEL_FILE).is_file()   # a checkpoint saved straight into the folder
    ours += [n for n in (*(CHECKPOINT_FILES if single else ()), LATEST_FILE, "loss.png", *outputs)
             if (out / n).exists()]
    ours += [BEST_DIR] if (out / BEST_DIR / MODEL_FILE).is_file() else []
    if ours and not overwrite:
        resume = f"continue it with --resume {out}, " if is_run_dir(out) else ""
        raise GPT2Error(f"--out {out} already holds a checkpoint ({', '.join(ours)}); {resume}choose another "
                        "--out, or pass --overwrite to replace it")


def clear_out_dir(out: Path, outputs=()) -> None:
    """--overwrite: remove the previous run's checkpoints (and `outputs`, the command's other
    files, as check_out_dir) from `out`, nothing else."""
    if not out.is_dir():
        return
    single = (out / MODEL_FILE).is_file()   # a checkpoint's files straight in the folder (else a
    mine = (*(CHECKPOINT_FILES if single else ()), "loss.png", *outputs)   # config.json there is yours)
    for n in (LATEST_FILE, *mine):
        (out / n).unlink(missing_ok=True)   # `latest` first: nothing points at a half-deleted checkpoint
    for ckpt in list_checkpoints(out):
        shutil.rmtree(ckpt)
    if (out / BEST_DIR / MODEL_FILE).is_file():   # only a checkpoint of ours
        shutil.rmtree(out / BEST_DIR)
    remove_leftovers(out)


def run_dir_of(ckpt_dir: Path) -> Path:
    """Where a resumed run saves: the run directory a ckpt-<step> checkpoint belongs to, or a
    single checkpoint directory itself (its new checkpoints go inside it, and `latest` wins)."""
    return ckpt_dir.parent if checkpoint_step(ckpt_dir) is not None else ckpt_dir


def check_resume_out(out: Path, ckpt_dir: Path, step: int) -> None:
    """A run resumed from step `step` of `ckpt_dir` saves into `out`: a new directory must hold
    no checkpoint, the run's own directory none later than that step."""
    if out.resolve() != run_dir_of(ckpt_dir).resolve():
        check_out_dir(out, overwrite=False)    # a new run directory, continuing from ckpt_dir
        return
    later = [c for c in list_checkpoints(out) if checkpoint_step(c) > step]
    if later:
        raise GPT2Error(f"{out} has a checkpoint after step {step} ({later[-1].name}); resume from that one "
                        f"(--resume {later[-1]}), or continue step {step} in a new directory (--out NEW)")


@dataclass
class RunSaver:
    """Saves a training run into its run directory `out` as it goes: a checkpoint when asked
    (every --save-every steps, at the end, on Ctrl-C), and with --keep-best the lowest validation
    loss so far as out/best (weights, config, tokenizer; no optimizer state).

    Every rank takes part in a save (ZeRO's moments and the ranks' generators are gathered);
    rank 0 writes the files."""

    out: Path
    model: object
    optimizer: object
    tokenizer: object
    train_loader: object
    state: object                      # train.TrainState, advanced by the training loop
    history: object                    # train.History
    comm: object
    run: dict                          # the run's settings, for --resume
    data_sha256: str
    keep: int                          # --keep: the newest N checkpoints stay
    saved_step: int | None = None      # the last step saved, and where
    saved_dir: Path | None = None
    best_val_loss: float | None = None   # survives a resume (it is saved in every checkpoint)
    _evals: int = field(init=False)    # validation losses already looked at by keep_best

    def __post_init__(self) -> None:
        self._evals = len(self.history.val_losses)

    def snapshot(self) -> dict:
        """The trainer state saved beside the weights: enough to resume exactly."""
        state = self.state
        snap = {"step": state.step, "epoch": state.epoch, "tokens_seen": state.tokens_seen,
                "skipped_steps": state.skipped_steps, "loader": self.train_loader.state_dict(),
                "history": self.history.to_dict(), "run": self.run, "data_sha256": self.data_sha256,
                "best_val_loss": self.best_val_loss}
        if self.comm.world_size > 1:   # (a collective) every rank's dropout generator, for an exact resume
            snap |= {"world_size": self.comm.world_size,
                     "rank_rng_states": self.comm.all_gather_object(mg.get_rng_state())}
        return snap

    def save(self) -> Path:
        """A checkpoint of the current step; returns its directory."""
        optimizer, step, out = self.optimizer, self.state.step, self.out
        full_optimizer = optimizer.consolidated() if hasattr(optimizer, "consolidated") else optimizer
        snap = self.snapshot()
        if self.comm.rank:
            self.saved_step, self.saved_dir = step, out / checkpoint_name(step)
            return self.saved_dir
        try:
            self.saved_dir = save_run_checkpoint(out, self.model, full_optimizer, snap, step=step,
                                                 keep=self.keep, tokenizer=self.tokenizer)
        except OSError as exc:   # disk full, permissions: the previous checkpoint is untouched
            last = latest_checkpoint(out)
            raise GPT2Error(f"could not save the checkpoint of step {step} in {out} ({exc}); "
                            + (f"the previous one, {last}, is intact" if last else "nothing was saved")
                            ) from None
        self.saved_step = step
        return self.saved_dir

    def keep_best(self) -> None:
        """After an evaluation: a lower validation loss than any before replaces out/best."""
        val_losses = self.history.val_losses
        if len(val_losses) == self._evals:
            return
        self._evals = len(val_losses)
        v = val_losses[-1]
        if math.isfinite(v) and (self.best_val_loss is None or v < self.best_val_loss):
            self.best_val_loss = v
            if self.comm.rank == 0:   # every rank has the same validation loss; rank 0 writes
                check_best_dir(self.out)   # (something else may have appeared there since the start)
                save_run_checkpoint(self.out, self.model, None, {"step": self.state.step, "val_loss": v},
                                    step=self.state.step, tokenizer=self.tokenizer, name=BEST_DIR)

    def save_final(self) -> Path:
        """The final checkpoint (its weights were saved already if the last step was a save step:
        then only its history is brought up to date)."""
        if self.saved_step == self.state.step:
            if self.comm.rank == 0:
                update_trainer_state(self.saved_dir, {"history": self.history.to_dict()})
            return self.saved_dir
        return self.save()
