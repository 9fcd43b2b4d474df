"""Loading that is safe: no pickle anywhere, every damaged or forged file is one GPT2Error.

Checkpoints and pretrained weights are read from safetensors and JSON only. A file that is
truncated, has a bad header, wrong dtypes, shapes that disagree with its config, NaNs or an
unknown format is a clear error naming it; the fuzz tests below feed the loaders thousands of
damaged files (random truncations, flipped bytes, random and forged headers) and require that
every single one either loads (a harmless flip) or raises GPT2Error -- never another exception,
never a hang, never a large allocation.
"""

from __future__ import annotations

import json
import random
import re
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from gpt2_helpers import ByteTokenizer, tiny_model

import minigrad as mg
from gpt2 import GPT2Error
from gpt2.checkpoint import load_checkpoint, load_model, save_checkpoint
from gpt2.data import create_loaders
from gpt2.pretrained import export_hf, load_pretrained
from gpt2.resume import restore_training
from gpt2.run_dir import save_run_checkpoint
from gpt2.safeio import read_json, read_safetensors, read_safetensors_header
from gpt2.train import TrainState, make_optimizer, train

REPO = Path(__file__).resolve().parent.parent
TEXT = "the cat sat on the mat and the dog ran under the tree. " * 12


def _trained_checkpoint(path: Path) -> Path:
    """A small but complete training checkpoint: model, AdamW moments, loader, rng, history."""
    model = tiny_model(vocab_size=256, context_length=8, emb_dim=8, n_heads=2, n_layers=1, dropout=0.1)
    train_loader, val_loader = create_loaders(TEXT, batch_size=2, max_length=8, tokenizer=ByteTokenizer())
    opt = make_optimizer(model, lr=1e-3)
    state = TrainState()
    history = train(model, train_loader, val_loader, opt, epochs=1, max_steps=3, eval_every=2, eval_iter=1,
                    progress=False, sample_prompt=None, state=state)
    return save_run_checkpoint(path, model, opt, {"step": state.step, "epoch": state.epoch,
                                                  "tokens_seen": state.tokens_seen,
                                                  "loader": train_loader.state_dict(),
                                                  "history": history.to_dict()}, step=state.step)


def _load_for_resume(path: Path):
    """What `train --resume` does with a checkpoint: load everything and restore it."""
    ckpt = load_checkpoint(path)
    train_loader, _ = create_loaders(TEXT, batch_size=2, max_length=8, tokenizer=ByteTokenizer())
    opt = make_optimizer(ckpt.model)
    restore_training(ckpt, opt, train_loader)
    for p in ckpt.model.parameters():
        assert np.isfinite(mg.to_numpy(p.data)).all()      # no NaN slips through a successful load
    for st in opt.state:
        for a in st.values():
            assert np.isfinite(mg.to_numpy(a)).all()
    return ckpt


# ---------------------------------------------------------------------------------------------
# no pickle anywhere
# ---------------------------------------------------------------------------------------------

def test_no_code_path_can_unpickle():
    """The package never imports pickle, never calls torch.load, and every np.load forbids pickles."""
    for path in sorted((REPO / "gpt2").glob("*.py")) + sorted((REPO / "minigrad").glob("*.py")):
        src = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib|torch)\b", src, re.M), path
        assert "torch.load" not in src and "pickle.load" not in src, path
        for call in re.findall(r"np\.load\([^)]*\)", src):
            assert "allow_pickle=False" in call, (path, call)


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    ckpt = _trained_checkpoint(tmp_path / "run")
    for name in ("model.safetensors", "optimizer.safetensors"):
        header = read_safetensors_header(ckpt / name)
        assert header.tensors and all(t.dtype == "F32" for t in header.tensors.values())
    for name in ("config.json", "trainer_state.json"):
        assert isinstance(read_json(ckpt / name), dict)


# ---------------------------------------------------------------------------------------------
# one clear error for each kind of damage
# ---------------------------------------------------------------------------------------------

def _write_safetensors_raw(path: Path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header, data, pattern", [
    (None, b"\x01\x02", r"not a safetensors file \(only 2 bytes\)"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\x00" * 4, r"truncated: tensor 'a'"),
    ({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4, "unknown dtype 'Q7'"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\x00" * 4, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, b"\x00" * 4, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}, b"\x00" * 4, "does not fit"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\x00" * 4, "invalid data_offsets"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", 4]}}, b"\x00" * 4, "invalid data_offsets"),
    ({"a": {"dtype": "F32", "shape": [1]}}, b"\x00" * 4, "lacks dtype, shape or data_offsets"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\x00" * 8, "gap"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 9, "5 bytes after the last"),
    ({"__metadata__": {"format": 3}}, b"", "__metadata__"),
    ([1, 2], b"", "not a JSON object"),
])
def test_safetensors_header_checks(tmp_path, header, data, pattern):
    path = tmp_path / "x.safetensors"
    if header is None:
        path.write_bytes(data)
    else:
        _write_safetensors_raw(path, header, data)
    with pytest.raises(GPT2Error, match=pattern) as e:
        read_safetensors(path)
    assert str(path) in str(e.value)


def test_header_length_beyond_the_file_and_non_json(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}")
    with pytest.raises(GPT2Error, match="truncated or not a safetensors file"):
        read_safetensors(path)
    path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    with pytest.raises(GPT2Error, match="corrupt safetensors header"):
        read_safetensors(path)
    deep = b"[" * 100_000 + b"]" * 100_000           # nesting deeper than the JSON parser recurses
    path.write_bytes(struct.pack("<Q", len(deep)) + deep)
    with pytest.raises(GPT2Error, match="corrupt safetensors header"):
        read_safetensors(path)


def test_forged_terabyte_header_allocates_nothing(tmp_path):
    """A 100-byte file whose header claims a 1 TB tensor (consistent shape and offsets): refused
    at once, without allocating it -- in our reader and in the checkpoint and pretrained loaders."""
    n = 2**40 // 4
    header = {"transformer.wte.weight": {"dtype": "F32", "shape": [n // 1024, 1024],
                                         "data_offsets": [0, 2**40]}}
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, tiny_model())
    _write_safetensors_raw(ckpt / "model.safetensors", header, b"\x00" * 64)
    hf = tmp_path / "hf"
    export_hf(tiny_model(), hf)
    _write_safetensors_raw(hf / "model.safetensors", header, b"\x00" * 64)
    tracemalloc.start()
    try:
        for load in (lambda: read_safetensors(ckpt / "model.safetensors"), lambda: load_model(ckpt),
                     lambda: load_pretrained(hf)):
            with pytest.raises(GPT2Error, match="truncated"):
                load()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20   # a forged header allocates nothing near what it claims


def test_checkpoint_dtype_shape_nan_and_format_errors(tmp_path):
    model = tiny_model()
    opt = make_optimizer(model)
    path = tmp_path / "c"
    save_checkpoint(path, model, opt, {"step": 0})
    weights = {n: mg.to_numpy(a) for n, a in model.state_dict().items()}

    def write(tensors, name="model.safetensors"):
        from safetensors.numpy import save_file
        save_file(tensors, str(path / name))

    write({**weights, "ln_f.bias": weights["ln_f.bias"].astype(np.int32)})
    with pytest.raises(GPT2Error, match="float tensors of one dtype.*I32"):
        load_model(path)
    write({**weights, "ln_f.bias": weights["ln_f.bias"].astype(np.float64)})
    with pytest.raises(GPT2Error, match="one dtype"):
        load_model(path)
    bad = dict(weights)
    bad["blocks.0.ln1.weight"] = np.ones(17, np.float32)
    bad["blocks.0.ln1.bias"] = np.ones(15, np.float32)   # the same count, the wrong shapes
    write(bad)
    with pytest.raises(GPT2Error, match="does not match.*blocks.0.ln1"):
        load_model(path)
    write({k: v for k, v in weights.items() if k != "ln_f.bias"})
    with pytest.raises(GPT2Error, match="does not match.*config describes"):
        load_model(path)
    nan = {k: v.copy() for k, v in weights.items()}
    nan["blocks.1.attn.proj.weight"][2, 3] = np.inf
    write(nan)
    with pytest.raises(GPT2Error, match=r"'blocks\.1\.attn\.proj\.weight' contains NaN or infinity"):
        load_model(path)
    write(weights)
    moments = {k: mg.to_numpy(v) for k, v in opt.state_dict()["tensors"].items()}
    assert load_model(path).config == model.config
    if moments:   # (a model that never stepped has no moments yet)
        k = next(iter(moments))
        write({**moments, k: moments[k] * np.nan}, "optimizer.safetensors")
        with pytest.raises(GPT2Error, match="NaN"):
            load_checkpoint(path)
    state = json.loads((path / "trainer_state.json").read_text())
    (path / "trainer_state.json").write_text(json.dumps({**state, "format_version": 99}))
    with pytest.raises(GPT2Error, match="newer version"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps({"n_embd": 16, "n_layer": 2}))
    with pytest.raises(GPT2Error, match="Hugging Face layout.*--pretrained"):
        load_model(path)
    for field, value in (("emb_dim", "16"), ("dropout", [0.1]), ("qkv_bias", "yes"), ("n_layers", 0),
                         ("n_heads", True), ("vocab_size", 10**30)):
        (path / "config.json").write_text(json.dumps({**model.config.to_dict(), field: value}))
        with pytest.raises(GPT2Error, match=field if field != "vocab_size" else "does not match"):
            load_model(path)
    (path / "config.json").write_text(json.dumps({**model.config.to_dict(), "colour": "red"}))
    with pytest.raises(GPT2Error, match="unknown field"):
        load_model(path)


@pytest.mark.parametrize("mutation, pattern", [
    (lambda s: [s], "JSON object"),
    (lambda s: {**s, "step": -3}, "step must be an integer"),
    (lambda s: {**s, "rng_state": {"seed": 1, "draws": 0, "pcg64": {"state": "x"}}}, "PCG64"),
    (lambda s: {**s, "rng_state": 7}, "rng_state"),
    (lambda s: {**s, "loader": {**s["loader"], "batch_index": -1}}, "data loader position"),
    (lambda s: {**s, "loader": {**s["loader"], "batch_index": 10**6}}, "outside"),
    (lambda s: {**s, "optimizer": {**s["optimizer"], "groups": "all"}}, "optimizer entry"),
    (lambda s: {**s, "optimizer": {**s["optimizer"], "groups": [{**s["optimizer"]["groups"][0],
                                                                  "betas": [0.9, 2]}]}}, "betas"),
    (lambda s: {**s, "optimizer": {**s["optimizer"], "groups": [{**s["optimizer"]["groups"][0],
                                                                  "num_params": 2}]}}, "does not match"),
    (lambda s: {**s, "optimizer": {**s["optimizer"], "type": "SGD"}}, "trained with SGD"),
    (lambda s: {**s, "history": {"train_losses": ["low"]}}, "history.train_losses"),
])
def test_trainer_state_is_checked_field_by_field(tmp_path, mutation, pattern):
    ckpt = _trained_checkpoint(tmp_path / "run")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps(mutation(state)))
    with pytest.raises(GPT2Error, match=pattern):
        _load_for_resume(tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# fuzzing
# ---------------------------------------------------------------------------------------------

def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([0, 1, -1, 2**63, 2**80, -(2**70), 7, 1024])
    if kind == 1:
        return rng.choice([0.5, -1e308, 1e308, float("nan"), float("inf"), 3.0])
    if kind == 2:
        return rng.choice(["", "F32", "F16", "F64", "I32", "BOOL", "x" * 50, "\u00e9", "F32\x00"])
    if kind == 3:
        return rng.choice([True, False])
    if kind == 4:
        return None
    if kind == 5:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["dtype", "shape", "data_offsets", "a", "__metadata__", "step"]):
            _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def _random_header(rng: random.Random, valid: dict) -> bytes:
    """A safetensors header made from a valid one with random entries, fields and lengths forged."""
    header = json.loads(json.dumps(valid))
    names = [n for n in header if n != "__metadata__"]
    for _ in range(rng.randrange(1, 4)):
        choice = rng.randrange(6)
        name = rng.choice(names)
        if not isinstance(header[name], dict):   # forged by an earlier round
            choice = 0
        if choice == 0:
            header[name] = _random_json(rng)
        elif choice == 1:
            header[name][rng.choice(["dtype", "shape", "data_offsets"])] = _random_json(rng)
        elif choice == 2:    # a huge tensor, with consistent or inconsistent offsets
            size = rng.choice([2**40, 2**62, 10**30])
            header[name]["shape"] = [size]
            header[name]["data_offsets"] = [0, 4 * size if rng.random() < 0.5 else 4]
        elif choice == 3:
            header[name]["data_offsets"] = [rng.randrange(-9, 10**6), rng.randrange(-9, 10**12)]
        elif choice == 4:
            header[rng.choice(["x", "blocks.9.y", name + "_"])] = dict(header[name])
        else:
            header["__metadata__"] = _random_json(rng)
    raw = json.dumps(header).encode()
    length = len(raw) if rng.random() < 0.8 else rng.choice([0, 1, len(raw) - 1, len(raw) + 1, 2**63])
    return struct.pack("<Q", length) + raw


def _mutate(rng: random.Random, data: bytes, name: str) -> bytes:
    kind = rng.randrange(4 if name.endswith(".safetensors") else 3)
    if kind == 0:                                   # truncated anywhere
        return data[:rng.randrange(len(data))]
    if kind == 1:                                   # a few flipped bits / bytes
        buf = bytearray(data)
        # Most flips in the header (where they do harm), some anywhere.
        limit = min(len(buf), 8 + 400) if rng.random() < 0.7 else len(buf)
        for _ in range(rng.randrange(1, 5)):
            i = rng.randrange(limit)
            buf[i] = buf[i] ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
        return bytes(buf)
    if kind == 2:                                   # random bytes / random JSON
        if rng.random() < 0.5:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        return json.dumps(_random_json(rng)).encode()
    (n,) = struct.unpack("<Q", data[:8])            # a forged safetensors header, same data
    return _random_header(rng, json.loads(data[8:8 + n])) + data[8 + n:]


def _fuzz(load, directory: Path, names, cases: int, seed: int):
    """Damage one file of `directory` per case and call `load()`: GPT2Error or success only."""
    rng = random.Random(seed)
    originals = {n: (directory / n).read_bytes() for n in names}
    outcomes = {"loaded": 0, "error": 0}
    for case in range(cases):
        name = names[case % len(names)]
        damaged = _mutate(rng, originals[name], name)
        (directory / name).write_bytes(damaged)
        t0 = time.perf_counter()
        try:
            load()
            outcomes["loaded"] += 1
        except GPT2Error as exc:
            assert str(exc)
            outcomes["error"] += 1
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {case} ({name}, seed {seed}): {type(exc).__name__}: {exc}\n"
                        f"first bytes: {damaged[:200]!r}")
        assert time.perf_counter() - t0 < 60, f"case {case} ({name}) hangs"   # a hang, not a speed
        (directory / name).write_bytes(originals[name])
    load()                                          # the undamaged files load again
    return outcomes


def test_fuzz_training_checkpoint(tmp_path):
    ckpt = _trained_checkpoint(tmp_path / "run")
    names = ["model.safetensors", "optimizer.safetensors", "config.json", "trainer_state.json"]
    outcomes = _fuzz(lambda: _load_for_resume(tmp_path / "run"), ckpt, names, cases=400, seed=0)
    assert outcomes["error"] > 300          # nearly every damage is noticed ...
    assert outcomes["error"] + outcomes["loaded"] == 400


def test_fuzz_pretrained_directory(tmp_path):
    hf = tmp_path / "hf"
    export_hf(tiny_model(vocab_size=64, context_length=8, emb_dim=8, n_heads=2, n_layers=1), hf)

    def load():
        model = load_pretrained(hf)
        for p in model.parameters():
            assert np.isfinite(mg.to_numpy(p.data)).all()

    outcomes = _fuzz(load, hf, ["model.safetensors", "config.json"], cases=300, seed=1)
    assert outcomes["error"] > 200
