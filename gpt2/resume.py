"""Resuming a run: the optimizer, the data loader, the random generator, the step and the
history put back exactly as a checkpoint saved them, each part checked as it is put back.

    ckpt = load_checkpoint("runs/verdict")              # follows runs/verdict/latest
    optimizer = make_optimizer(ckpt.model)
    state, history = restore_training(ckpt, optimizer, train_loader)
    train(ckpt.model, train_loader, val_loader, optimizer, cfg, state=state, history=history)
"""

from __future__ import annotations

import minigrad as mg

from .checkpoint import _DAMAGED, OPTIMIZER_FILE, STATE_FILE, Checkpoint
from .errors import GPT2Error
from .train import History, TrainState


def restore_training(ckpt: Checkpoint, optimizer, train_loader=None) -> tuple[TrainState, History]:
    """Put a run back exactly where it was when `ckpt` was saved, for `train()` to continue:
    the optimizer's moments, step count and hyper-parameters, the data loader's epoch and
    position (its shuffle order is a function of (seed, epoch)), and minigrad's random
    generator (dropout). Returns the run's (TrainState, History).

    Each part of trainer_state.json is checked by what takes it (TrainState, History, the
    optimizer, the loader, the generator); a damaged part is one GPT2Error naming the file.
    """
    ts, where = ckpt.trainer_state, ckpt.path or "the checkpoint"
    if ts is None or ckpt.optimizer_state is None or "rng_state" not in ts:
        raise GPT2Error(f"{where} holds a model but no training state (optimizer, step, random "
                        "generator), so it cannot be resumed; it can still be used to generate")
    try:                                       # parsed first: nothing is changed if they are bad
        state = TrainState.from_dict(ts)
        history = History.from_dict(ts.get("history") or {})
    except ValueError as exc:
        raise GPT2Error(f"{where}/{STATE_FILE}: {exc}{_DAMAGED}") from None
    saved = ts["optimizer"]
    if not (isinstance(saved, dict) and isinstance(saved.get("type"), str)):
        raise GPT2Error(f"{where}/{STATE_FILE}: the optimizer entry needs a type, a step and parameter "
                        f"groups{_DAMAGED}")
    if saved["type"] != type(optimizer).__name__:
        raise GPT2Error(f"{where} was trained with {saved['type']}, not {type(optimizer).__name__}")
    try:
        optimizer.load_state_dict(ckpt.optimizer_state)
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise GPT2Error(f"{where}: the optimizer entry of {STATE_FILE} or {OPTIMIZER_FILE} is invalid: "
                        f"{exc}{_DAMAGED}") from None
    if train_loader is not None:
        if "loader" not in ts:
            raise GPT2Error(f"{where}/{STATE_FILE} has no data loader position, so it cannot be resumed")
        train_loader.load_state_dict(ts["loader"])
    try:
        mg.set_rng_state(ts["rng_state"])
    except ValueError as exc:
        raise GPT2Error(f"{where}/{STATE_FILE}: {exc}{_DAMAGED}") from None
    return state, history
