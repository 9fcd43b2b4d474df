"""Checkpoints: a directory that holds everything needed to rebuild a model (and resume training).

    runs/verdict/ckpt-000090/
      config.json              the GPTConfig, so the model can be rebuilt with the right shape
      model.safetensors        every parameter by name (blocks.0.attn.qkv.weight, ...)
      optimizer.safetensors    AdamW's moments m and v, one pair per parameter   (training only)
      trainer_state.json       step, epoch, tokens seen, optimizer hyper-parameters, the random
                               generator's state, the data loader's position      (training only)
      tokenizer.json           the tokenizer the model was trained with: {"type": "gpt2"} or
                               {"type": "char", "chars": ...}; absent in older checkpoints (gpt2)

safetensors is a flat header + raw bytes: loading it runs no code (unlike pickle) and gives back
exactly the bytes that were saved, so a reloaded model is bit-for-bit the one that was saved.
Every file is written to a temporary name in the same folder and renamed into place
(gpt2/safeio.py), so a crash mid-save leaves the previous file intact rather than half a file.
Loading checks every file before trusting it: a truncated or forged file, wrong dtypes, shapes
that disagree with config.json, or NaNs are one GPT2Error naming the file. trainer_state.json is
read here as a JSON object of a known format version; each part of it is checked by what uses
it, when a run is resumed (gpt2/resume.py).

Everything that loads accepts a checkpoint directory or a training run's directory, whose
newest complete `ckpt-<step>/` it loads (gpt2/run_dir.py writes those).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import minigrad as mg
from minigrad import backend

from . import safeio
from .config import LORA_TARGETS, GPTConfig
from .errors import GPT2Error
from .model import GPTModel, build_uninitialised
from .tokenizer import get_tokenizer, tokenizer_from_dict

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
# Writing
# ---------------------------------------------------------------------------------------------

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
    safeio.write_json(path / CONFIG_FILE, model.config.to_dict())
    if tokenizer is not None:
        if tokenizer.vocab_size != model.config.vocab_size:
            raise GPT2Error(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                            f"{model.config.vocab_size}; save the model with its own tokenizer")
        safeio.write_json(path / TOKENIZER_FILE, tokenizer.to_dict())
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
    safeio.write_json(path / STATE_FILE, trainer_state)
    return path


# ---------------------------------------------------------------------------------------------
# Finding a checkpoint: a checkpoint directory, or the newest of a run directory
# ---------------------------------------------------------------------------------------------

def checkpoint_name(step: int) -> str:
    """The name of a run directory's checkpoint after `step` steps: ckpt-000090."""
    return f"ckpt-{step:06d}"


def checkpoint_step(path) -> int | None:
    """The step of a `ckpt-<step>` directory's name (None: not such a name)."""
    m = _CKPT_DIR.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir) -> list[Path]:
    """The complete checkpoints `ckpt-<step>/` of a run directory, oldest (lowest step) first."""
    try:
        entries = list(Path(run_dir).iterdir())
    except OSError:
        return []
    found = [p for p in entries if checkpoint_step(p) is not None and is_checkpoint(p)]
    return sorted(found, key=checkpoint_step)


def is_run_dir(path) -> bool:
    """Whether `path` is a training run's directory (has `latest` or any ckpt-<step>/ or an
    unfinished .tmp-ckpt-*), rather than a single checkpoint."""
    path = Path(path)
    if (path / LATEST_FILE).exists():
        return True
    try:
        return any(checkpoint_step(p) is not None or p.name.startswith(".tmp-ckpt-") for p in path.iterdir())
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
    # What a fine-tuned model became (absent, or null: a plain GPT-2)
    if d.get("num_classes") is not None and not _is_int(d["num_classes"], 2):
        raise GPT2Error(f"{path}: num_classes must be an integer >= 2 (a classifier) or null, got "
                        f"{str(d['num_classes'])[:40]}")
    if d.get("lora_rank") is not None and not _is_int(d["lora_rank"], 1):
        raise GPT2Error(f"{path}: lora_rank must be a positive integer or null, got "
                        f"{str(d['lora_rank'])[:40]}")
    if d.get("lora_alpha") is not None and not (_is_number(d["lora_alpha"]) and d["lora_alpha"] > 0):
        raise GPT2Error(f"{path}: lora_alpha must be a number > 0 or null, got {str(d['lora_alpha'])[:40]}")
    targets = d.get("lora_targets")
    if targets is not None and not (isinstance(targets, list) and all(t in LORA_TARGETS for t in targets)):
        raise GPT2Error(f"{path}: lora_targets must be a list of layer names from {', '.join(LORA_TARGETS)}, "
                        f"got {str(targets)[:40]}")
    if targets is None:
        d = {k: v for k, v in d.items() if k != "lora_targets"}
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
            opt = opt if isinstance(opt, dict) else {}   # checked by the optimizer it is loaded into
            ckpt.optimizer_state = {"step": opt.get("step"), "groups": opt.get("groups"),
                                    "tensors": _read_safetensors(path / OPTIMIZER_FILE)}
    return ckpt


# ---------------------------------------------------------------------------------------------
# trainer_state.json
# ---------------------------------------------------------------------------------------------

def _read_trainer_state(path: Path) -> dict:
    """A JSON object of a format this version reads. Its fields are checked by what uses them
    (gpt2/resume.py): the optimizer, the loader, the random generator, the history."""
    state = _read_json(path)
    if not isinstance(state, dict):
        raise GPT2Error(f"{path}: must hold a JSON object{_DAMAGED}")
    version = state.get("format_version", 1)
    if not _is_int(version, 1):
        raise GPT2Error(f"{path}: format_version must be a positive integer, got {str(version)[:40]}"
                        f"{_DAMAGED}")
    if version > FORMAT_VERSION:
        raise GPT2Error(f"{path} was written by a newer version of minigrad-gpt2 (format {version}; this "
                        f"one reads up to {FORMAT_VERSION}): upgrade to load it")
    return state


def read_trainer_state(path) -> dict | None:
    """The trainer_state.json of a checkpoint (or of a run's latest), None if it has none; reads
    no weights."""
    path = resolve_checkpoint(path)
    return _read_trainer_state(path / STATE_FILE) if (path / STATE_FILE).is_file() else None


def update_trainer_state(path, updates: dict) -> None:
    """Rewrite a checkpoint's trainer_state.json with some fields changed (atomically), e.g. the
    history after the end-of-training sample, without saving the unchanged weights again."""
    path = resolve_checkpoint(path)
    state = _read_trainer_state(path / STATE_FILE)
    safeio.write_json(path / STATE_FILE, {**state, **updates})


