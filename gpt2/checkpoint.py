"""Checkpoints: a directory that holds everything needed to rebuild a model (and resume training).

    runs/verdict/
      config.json              the GPTConfig, so the model can be rebuilt with the right shape
      model.safetensors        every parameter by name (blocks.0.attn.qkv.weight, ...)
      optimizer.safetensors    AdamW's moments m and v, one pair per parameter   (training only)
      trainer_state.json       step, epoch, tokens seen, optimizer hyper-parameters, the random
                               generator's state, the data loader's position      (training only)
      tokenizer.json           the tokenizer the model was trained with: {"type": "gpt2"} or
                               {"type": "char", "chars": ...}; absent in older checkpoints (gpt2)

safetensors is a flat header + raw bytes: loading it runs no code (unlike pickle) and gives back
exactly the bytes that were saved, so a reloaded model is bit-for-bit the one that was saved.
Every file is written to a temporary name in the same folder and renamed into place, so a crash
mid-save leaves the previous file intact rather than half a file. Loading checks every file
before trusting it (gpt2/safeio.py): a truncated or forged file, wrong dtypes, shapes that
disagree with config.json, or NaNs are one GPT2Error naming the file.

A training run (`python -m gpt2 train --out runs/verdict`) keeps a *run directory* of them:

    runs/verdict/
      ckpt-000100/             one checkpoint directory as above, per save (the last --keep kept)
      ckpt-000200/
      latest                   the name of the newest complete checkpoint ("ckpt-000200")
      loss.png

`save_run_checkpoint` builds each checkpoint in a hidden temporary directory, renames it into
place only once every file is on disk, and only then moves `latest`; a `kill -9` at any moment
leaves `latest` naming a complete checkpoint. Everything that loads accepts either a run
directory (following `latest`) or a single checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import minigrad as mg
from minigrad import backend

from . import safeio
from .config import GPTConfig
from .errors import GPT2Error
from .model import GPTModel, build_uninitialised

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINT_FILES = (CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, TOKENIZER_FILE)
FORMAT_VERSION = 1
LATEST_FILE = "latest"
_CKPT_DIR = re.compile(r"ckpt-(\d{1,15})")
# Appended to the message of every damaged-file error while loading a checkpoint.
_DAMAGED = " (the checkpoint is damaged: load an earlier one, or train again)"


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns. `optimizer_state` feeds `optimizer.load_state_dict()`."""
    model: GPTModel
    config: GPTConfig
    optimizer_state: dict | None = None   # {"step", "groups", "tensors"} or None
    trainer_state: dict | None = None     # the JSON written by save_checkpoint, or None
    path: Path | None = None              # the checkpoint directory it was read from
    tokenizer: object | None = None       # from tokenizer.json (None: not recorded, i.e. gpt2)


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------

def _write_json(path: Path, obj) -> None:
    safeio.write_json(path, obj)   # temporary file, fsync, rename, fsync the folder


def _write_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    # Host copies, C-contiguous (safetensors stores raw row-major bytes).
    arrays = {name: np.ascontiguousarray(backend.to_numpy(a)) for name, a in tensors.items()}
    safeio.write_safetensors(path, arrays, metadata)


def _pause_for_tests() -> None:
    """GPT2_TEST_SAVE_DELAY=<seconds> sleeps between the files of every save, so the crash tests
    (tests/test_resume.py) can kill a training process in the middle of one. Unset: nothing."""
    try:
        delay = float(os.environ.get("GPT2_TEST_SAVE_DELAY") or 0)
    except ValueError:
        return
    if delay > 0:
        time.sleep(delay)


def _check_finite(model: GPTModel, optimizer) -> None:
    """Refuse to save a diverged model: the last good checkpoint stays the newest."""
    xp = backend.xp
    for name, p in model.named_parameters():
        if not bool(xp.isfinite(p.data).all()):
            raise GPT2Error(f"not saving: parameter {name} contains NaN or infinity (training diverged); "
                            "the previous checkpoint is kept")
    if optimizer is not None:
        for st in optimizer.state:
            if not all(bool(xp.isfinite(a).all()) for a in st.values()):
                raise GPT2Error("not saving: the optimizer state contains NaN or infinity (training "
                                "diverged); the previous checkpoint is kept")


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

def save_checkpoint(path, model: GPTModel, optimizer=None, state=None, tokenizer=None) -> Path:
    """Write `model` (and, for training, `optimizer` and `state`) into the directory `path`.
    `tokenizer` (anything with `to_dict()`) is recorded in tokenizer.json, so generation decodes
    with the tokenizer the model was trained with.

    `state` is a dict or dataclass (e.g. TrainState) of JSON-able values; the optimizer's
    hyper-parameters and step count and minigrad's random-generator state are added to it.
    Returns the directory.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise GPT2Error(f"checkpoint path {path} exists and is not a directory; choose another path")
    _check_finite(model, optimizer)
    path.mkdir(parents=True, exist_ok=True)
    _write_json(path / CONFIG_FILE, model.config.to_dict())
    if tokenizer is not None:
        if tokenizer.vocab_size != model.config.vocab_size:
            raise GPT2Error(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                            f"{model.config.vocab_size}; save the model with its own tokenizer")
        _write_json(path / TOKENIZER_FILE, tokenizer.to_dict())
    _pause_for_tests()
    _write_safetensors(path / MODEL_FILE, model.state_dict(), metadata={"format": "minigrad-gpt2"})
    if optimizer is None and state is None:
        for stale in (OPTIMIZER_FILE, STATE_FILE):   # left from an earlier training save
            (path / stale).unlink(missing_ok=True)
        return path
    if optimizer is None:
        (path / OPTIMIZER_FILE).unlink(missing_ok=True)
    trainer_state = {"format_version": FORMAT_VERSION}
    if state is not None:
        trainer_state.update(dataclasses.asdict(state) if dataclasses.is_dataclass(state) else dict(state))
    if optimizer is not None:
        opt = optimizer.state_dict()
        _pause_for_tests()
        _write_safetensors(path / OPTIMIZER_FILE, opt["tensors"])
        trainer_state["optimizer"] = {"type": type(optimizer).__name__, "step": opt["step"],
                                      "groups": opt["groups"]}
    trainer_state["rng_state"] = mg.get_rng_state()
    _pause_for_tests()
    # Written last: a directory with trainer_state.json has all the other files of this save.
    _write_json(path / STATE_FILE, trainer_state)
    return path


# ---------------------------------------------------------------------------------------------
# Run directories: ckpt-<step>/ ... and `latest`
# ---------------------------------------------------------------------------------------------

def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:06d}"


def _step_of(path: Path) -> int:
    return int(_CKPT_DIR.fullmatch(path.name).group(1))


def list_checkpoints(run_dir) -> list[Path]:
    """The complete checkpoints `ckpt-<step>/` of a run directory, oldest (lowest step) first."""
    try:
        entries = list(Path(run_dir).iterdir())
    except OSError:
        return []
    found = [p for p in entries if _CKPT_DIR.fullmatch(p.name) and is_checkpoint(p)]
    return sorted(found, key=_step_of)


def is_run_dir(path) -> bool:
    """Whether `path` is a training run's directory (has `latest` or any ckpt-<step>/ or an
    unfinished .tmp-ckpt-*), rather than a single checkpoint."""
    path = Path(path)
    if (path / LATEST_FILE).exists():
        return True
    try:
        return any(_CKPT_DIR.fullmatch(p.name) or p.name.startswith(".tmp-ckpt-") for p in path.iterdir())
    except OSError:
        return False


def latest_checkpoint(run_dir) -> Path | None:
    """The newest complete checkpoint of a run directory (None if it has none).

    That is the one `latest` names -- except after a crash in the instant between renaming a new
    checkpoint into place and moving `latest` to it: that checkpoint is already complete (it is
    renamed only once every file is on disk), so it is the one to continue from.
    """
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path) -> Path:
    """A run directory (-> the checkpoint `latest` names) or a checkpoint directory -> the
    checkpoint directory to load. GPT2Error if there is none."""
    path = Path(path)
    if not path.is_dir():
        raise GPT2Error(f"checkpoint directory {path} does not exist; train one with "
                        "`python -m gpt2 train --out DIR`, or check the path")
    if is_run_dir(path):
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise GPT2Error(f"{path} is a training run directory without a complete checkpoint yet "
                            "(was it stopped during its first save?); train again")
        return ckpt
    _check_dir(path)
    return path


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


def save_run_checkpoint(run_dir, model: GPTModel, optimizer=None, state=None, *, step: int,
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


def update_trainer_state(path, updates: dict) -> None:
    """Rewrite a checkpoint's trainer_state.json with some fields changed (atomically), e.g. the
    history after the end-of-training sample, without saving the unchanged weights again."""
    path = resolve_checkpoint(path)
    state = _read_trainer_state(path / STATE_FILE)
    _write_json(path / STATE_FILE, {**state, **updates})


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def is_checkpoint(path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file()


def _read_json(path: Path) -> dict:
    return safeio.read_json(path, _DAMAGED)


def _read_safetensors(path: Path, header=None) -> dict:
    """Float tensors only, each checked for NaN/infinity; a damaged file is a GPT2Error."""
    return safeio.read_safetensors(path, safeio.FLOAT_DTYPES, fix=_DAMAGED, header=header)


def _is_int(v, minimum: int | None = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (minimum is None or v >= minimum)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_config(path: Path) -> GPTConfig:
    d = _read_json(path)
    if not isinstance(d, dict):
        raise GPT2Error(f"{path} must hold a JSON object (the model's config){_DAMAGED}")
    if "n_embd" in d and "emb_dim" not in d:
        raise GPT2Error(f"{path} is in the Hugging Face layout, not a checkpoint of ours: load it with "
                        "--pretrained DIR (gpt2.pretrained.load_pretrained)")
    for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
        if name in d and not _is_int(d[name], 1):
            raise GPT2Error(f"{path}: {name} must be a positive integer, got {str(d[name])[:40]}")
    for name in ("qkv_bias", "tie_embeddings"):
        if name in d and not isinstance(d[name], bool):
            raise GPT2Error(f"{path}: {name} must be true or false, got {str(d[name])[:40]}")
    if "dropout" in d and not _is_number(d["dropout"]):
        raise GPT2Error(f"{path}: dropout must be a number in [0, 1), got {str(d['dropout'])[:40]}")
    try:
        return GPTConfig.from_dict(d)
    except GPT2Error as exc:
        raise GPT2Error(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise GPT2Error(f"{path}: not a model config ({exc})") from None


def load_config(path) -> GPTConfig:
    """The GPTConfig of a checkpoint (or of the latest checkpoint of a run directory)."""
    return _read_config(resolve_checkpoint(path) / CONFIG_FILE)


def _check_dir(path: Path) -> None:
    if not path.is_dir():
        raise GPT2Error(f"checkpoint directory {path} does not exist; train one with "
                        "`python -m gpt2 train --out DIR`, or check the path")
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (path / name).is_file():
            raise GPT2Error(f"{path} is not a checkpoint: {name} is missing")


def _read_tokenizer(path: Path, config: GPTConfig):
    """The character tokenizer recorded in `path`/tokenizer.json, or None for GPT-2's BPE (recorded
    as such, or nothing recorded: older checkpoints)."""
    from .tokenizer import tokenizer_from_dict  # noqa: PLC0415

    file = path / TOKENIZER_FILE
    if not file.is_file():
        return None
    record = _read_json(file)
    if isinstance(record, dict) and record.get("type") == "gpt2":
        return None   # GPT-2's BPE: built (with its vocabulary files) only when text is encoded
    try:
        tok = tokenizer_from_dict(record)
    except GPT2Error as exc:
        raise GPT2Error(f"{file}: {exc}{_DAMAGED}") from None
    if tok.vocab_size != config.vocab_size:
        raise GPT2Error(f"{file} describes {tok.vocab_size} tokens but {path / CONFIG_FILE} a vocabulary of "
                        f"{config.vocab_size}{_DAMAGED}")
    return tok


def load_tokenizer(path):
    """The tokenizer a checkpoint was trained with: the one in tokenizer.json, else GPT-2's BPE."""
    from .tokenizer import get_tokenizer  # noqa: PLC0415

    path = resolve_checkpoint(path)
    return _read_tokenizer(path, _read_config(path / CONFIG_FILE)) or get_tokenizer()


def load_model(path) -> GPTModel:
    """The model saved in `path`, on the current backend, with exactly the saved weights."""
    return _load(path, with_state=False, optimizer=False).model


def load_checkpoint(path, optimizer: bool = True) -> Checkpoint:
    """Rebuild the model saved in directory `path` (bit-exact), plus the optimizer and trainer
    state when they were saved (and `optimizer` is True). `path` is a checkpoint directory or a
    run directory (its `latest` checkpoint is loaded). Missing, corrupt or inconsistent files:
    GPT2Error naming the file.

    Loading does not change minigrad's random generator: `restore_training` does that (or
    mg.set_rng_state(trainer_state["rng_state"])) when resuming a run.
    """
    return _load(path, with_state=True, optimizer=optimizer)


def _load(path, with_state: bool, optimizer: bool) -> Checkpoint:
    path = resolve_checkpoint(path)
    config = _read_config(path / CONFIG_FILE)
    model_file = path / MODEL_FILE
    # Everything the header says is checked against the file and the config before a single
    # tensor (or the model) is allocated: a forged file cannot make us allocate more than its size.
    header = safeio.read_safetensors_header(model_file, _DAMAGED)
    dtypes = {t.dtype for t in header.tensors.values()}
    if len(dtypes) != 1 or not dtypes <= set(safeio.FLOAT_DTYPES):
        raise GPT2Error(f"{model_file} should hold float tensors of one dtype, found {sorted(dtypes)}")
    numel = sum(t.numel for t in header.tensors.values())
    if numel != config.num_parameters():
        raise GPT2Error(f"{model_file} does not match {path / CONFIG_FILE}: the config describes "
                        f"{config.num_parameters():,} parameters, the file holds {numel:,}")
    weights = _read_safetensors(model_file, header)
    dtype = next(iter(weights.values())).dtype
    # A skeleton in the saved dtype: no random init (it would be overwritten at once), and the
    # caller's random generator is not touched.
    model = build_uninitialised(config, dtype)
    try:
        model.load_state_dict(weights)
    except (KeyError, ValueError) as exc:
        raise GPT2Error(f"{model_file} does not match {path / CONFIG_FILE}: {exc}") from None
    ckpt = Checkpoint(model=model, config=config, path=path, tokenizer=_read_tokenizer(path, config))
    if with_state and (path / STATE_FILE).is_file():
        ckpt.trainer_state = _read_trainer_state(path / STATE_FILE)
        opt = ckpt.trainer_state.get("optimizer")
        if optimizer and opt is not None:
            if not (path / OPTIMIZER_FILE).is_file():
                raise GPT2Error(f"{path / OPTIMIZER_FILE} is missing, but {STATE_FILE} says it was saved")
            ckpt.optimizer_state = {"step": opt["step"], "groups": opt["groups"],
                                    "tensors": _read_safetensors(path / OPTIMIZER_FILE)}
    return ckpt


# ---------------------------------------------------------------------------------------------
# trainer_state.json: checked field by field, since a resumed run acts on every one of them
# ---------------------------------------------------------------------------------------------

_HISTORY_NUMBERS = ("steps", "epochs", "tokens_seen", "train_losses", "val_losses", "lrs")


def _read_trainer_state(path: Path) -> dict:
    state = _read_json(path)

    def bad(what: str) -> GPT2Error:
        return GPT2Error(f"{path}: {what}{_DAMAGED}")

    if not isinstance(state, dict):
        raise bad("must hold a JSON object")
    version = state.get("format_version", 1)
    if not _is_int(version, 1):
        raise bad(f"format_version must be a positive integer, got {str(version)[:40]}")
    if version > FORMAT_VERSION:
        raise GPT2Error(f"{path} was written by a newer version of minigrad-gpt2 (format {version}; this "
                        f"one reads up to {FORMAT_VERSION}): upgrade to load it")
    for key in ("step", "epoch", "tokens_seen", "skipped_steps"):
        if key in state and not _is_int(state[key]):
            raise bad(f"{key} must be an integer >= 0, got {str(state[key])[:40]}")
    rng = state.get("rng_state")
    if rng is not None:
        if not (isinstance(rng, dict) and _is_int(rng.get("seed")) and _is_int(rng.get("draws"))
                and isinstance(rng.get("pcg64"), dict)):
            raise bad("rng_state is not a random generator state")
        try:   # let NumPy check the generator state on a throwaway generator
            np.random.PCG64(rng["seed"]).state = rng["pcg64"]
        except Exception:
            raise bad("rng_state is not a valid PCG64 state") from None
    opt = state.get("optimizer")
    if opt is not None:
        if not (isinstance(opt, dict) and isinstance(opt.get("type"), str) and _is_int(opt.get("step"))
                and isinstance(opt.get("groups"), list) and opt["groups"]):
            raise bad("the optimizer entry needs a type, a step and parameter groups")
        for g in opt["groups"]:
            if not isinstance(g, dict) or not _is_int(g.get("num_params")):
                raise bad("each optimizer group needs num_params")
            for k, v in g.items():
                ok = (_is_number(v) and v >= 0) if k != "betas" else (
                    isinstance(v, list) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v))
                if not ok and not isinstance(v, bool):
                    raise bad(f"optimizer setting {k!r} has an invalid value {str(v)[:40]}")
    loader = state.get("loader")
    if loader is not None:
        if not (isinstance(loader, dict)
                and all(_is_int(loader.get(k)) for k in ("epoch", "batch_index", "seed"))
                and all(_is_int(loader[k], 1) for k in ("batch_size", "num_windows") if k in loader)
                and isinstance(loader.get("shuffle", False), bool)):
            raise bad("the data loader position is invalid")
    history = state.get("history")
    if history is not None:
        if not isinstance(history, dict):
            raise bad("history must be a JSON object")
        for key in _HISTORY_NUMBERS:
            v = history.get(key, [])
            if not (isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                for x in v)):
                raise bad(f"history.{key} must be a list of numbers")
        if not (isinstance(history.get("samples", []), list)
                and all(isinstance(x, str) for x in history.get("samples", []))):
            raise bad("history.samples must be a list of strings")
        if not _is_number(history.get("seconds", 0.0)):
            raise bad("history.seconds must be a number")
    return state


def read_trainer_state(path) -> dict | None:
    """The checked trainer_state.json of a checkpoint (or of a run's latest), None if it has none;
    reads no weights."""
    path = resolve_checkpoint(path)
    return _read_trainer_state(path / STATE_FILE) if (path / STATE_FILE).is_file() else None


def restore_training(ckpt: Checkpoint, optimizer, train_loader=None):
    """Put a run back exactly where it was when `ckpt` was saved, for `train()` to continue:
    the optimizer's moments, step count and hyper-parameters, the data loader's epoch and
    position (its shuffle order is a function of (seed, epoch)), and minigrad's random
    generator (dropout). Returns the run's (TrainState, History).

        ckpt = load_checkpoint("runs/verdict")              # follows runs/verdict/latest
        optimizer = make_optimizer(ckpt.model)
        state, history = restore_training(ckpt, optimizer, train_loader)
        train(ckpt.model, train_loader, val_loader, optimizer, cfg, state=state, history=history)
    """
    from .train import History, TrainState  # noqa: PLC0415

    ts, where = ckpt.trainer_state, ckpt.path or "the checkpoint"
    if ts is None or ckpt.optimizer_state is None or "rng_state" not in ts:
        raise GPT2Error(f"{where} holds a model but no training state (optimizer, step, random "
                        "generator), so it cannot be resumed; it can still be used to generate")
    saved_type = ts["optimizer"]["type"]
    if saved_type != type(optimizer).__name__:
        raise GPT2Error(f"{where} was trained with {saved_type}, not {type(optimizer).__name__}")
    try:
        optimizer.load_state_dict(ckpt.optimizer_state)
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise GPT2Error(f"{where}/{OPTIMIZER_FILE} does not match the model's parameters ({exc})"
                        f"{_DAMAGED}") from None
    if train_loader is not None:
        if "loader" not in ts:
            raise GPT2Error(f"{where}/{STATE_FILE} has no data loader position, so it cannot be resumed")
        train_loader.load_state_dict(ts["loader"])
    mg.set_rng_state(ts["rng_state"])
    state = TrainState(step=ts.get("step", 0), epoch=ts.get("epoch", 0), tokens_seen=ts.get("tokens_seen", 0))
    if "skipped_steps" in ts and hasattr(state, "skipped_steps"):
        state.skipped_steps = ts["skipped_steps"]
    history = History.from_dict(ts.get("history") or {})
    return state, history
