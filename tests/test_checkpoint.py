"""gpt2.checkpoint: bit-exact round trips of model, optimizer and generator state; clear errors."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from gpt2_helpers import tiny_model

import minigrad as mg
from gpt2 import GPT2Error, generate
from gpt2.checkpoint import is_checkpoint, load_checkpoint, load_model, save_checkpoint
from gpt2.train import TrainState, make_optimizer
from minigrad import functional as F

# Every test here runs on NumPy and on CuPy (a real GPU, or the strict CPU stand-in).
pytestmark = pytest.mark.usefixtures("backend")


def _train_steps(model, opt, n, seed=0):
    rng = np.random.default_rng(seed)
    V, T = model.config.vocab_size, model.config.context_length
    for _ in range(n):
        seq = rng.integers(0, V, size=(2, T + 1))
        opt.zero_grad()
        F.cross_entropy(model(seq[:, :-1]), seq[:, 1:]).backward()
        opt.step()


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        np.testing.assert_array_equal(mg.to_numpy(sa[name]), mg.to_numpy(sb[name]), err_msg=name)


@pytest.mark.parametrize("tie", [False, True])
def test_model_round_trip_is_bit_exact(tmp_path, tie):
    model = tiny_model(tie_embeddings=tie, dropout=0.1)
    opt = make_optimizer(model, lr=1e-2)
    _train_steps(model, opt, 2)                 # weights no longer equal to any fresh init
    save_checkpoint(tmp_path / "ckpt", model)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == model.config
    _assert_same_weights(model, loaded)
    ids = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(generate(model, ids, 5), generate(loaded, ids, 5))


def test_float64_model_keeps_its_dtype(tmp_path):
    mg.set_default_dtype(np.float64)
    model = tiny_model()
    mg.set_default_dtype(np.float32)
    save_checkpoint(tmp_path, model)
    loaded = load_model(tmp_path)
    assert loaded.tok_emb.weight.dtype == np.float64
    _assert_same_weights(model, loaded)


def test_files_are_safetensors_and_json_not_pickle(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path, model, make_optimizer(model), state=TrainState(step=3))
    for name in ("model.safetensors", "optimizer.safetensors"):
        raw = (tmp_path / name).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])             # safetensors: 8-byte header length + JSON header
        header = json.loads(raw[8:8 + n])
        assert all(v["dtype"] == "F32" for k, v in header.items() if k != "__metadata__")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vocab_size"] == 64 and config["tie_embeddings"] is False
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))   # no temporaries left


def test_training_state_round_trip_continues_identically(tmp_path):
    """Save mid-run, reload into a fresh model + optimizer, continue: the same weights, bit for bit,
    as the run that never stopped (optimizer moments, step count and dropout generator restored)."""
    model = tiny_model(dropout=0.2)
    opt = make_optimizer(model, lr=3e-3)
    _train_steps(model, opt, 3, seed=1)
    mg.manual_seed(42)
    save_checkpoint(tmp_path, model, opt, state={**vars(TrainState(step=3, epoch=1, tokens_seen=96)),
                                                 "note": "hello"})
    _train_steps(model, opt, 2, seed=2)          # the uninterrupted run

    mg.manual_seed(999)                          # whatever happened in between
    ckpt = load_checkpoint(tmp_path)
    state = ckpt.trainer_state
    assert (state["step"], state["epoch"], state["tokens_seen"], state["note"]) == (3, 1, 96, "hello")
    assert state["optimizer"]["step"] == 3 and state["optimizer"]["groups"][0]["lr"] == 3e-3
    opt2 = make_optimizer(ckpt.model, lr=1.0)
    opt2.load_state_dict(ckpt.optimizer_state)
    assert opt2.param_groups[0]["lr"] == 3e-3 and opt2.step_count == 3
    mg.set_rng_state(state["rng_state"])
    _train_steps(ckpt.model, opt2, 2, seed=2)
    _assert_same_weights(model, ckpt.model)


def test_loading_does_not_touch_the_random_generator(tmp_path):
    save_checkpoint(tmp_path, tiny_model())
    mg.manual_seed(7)
    before = mg.get_rng_state()
    load_model(tmp_path)
    assert mg.get_rng_state() == before


def test_model_only_save_removes_stale_training_files(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path, model, make_optimizer(model), state={"step": 1})
    assert (tmp_path / "trainer_state.json").exists() and (tmp_path / "optimizer.safetensors").exists()
    save_checkpoint(tmp_path, model)
    assert not (tmp_path / "trainer_state.json").exists()
    assert load_checkpoint(tmp_path).optimizer_state is None


def test_missing_and_broken_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(GPT2Error, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(GPT2Error, match="config.json is missing"):
        load_model(tmp_path)
    assert not is_checkpoint(tmp_path)
    model = tiny_model()
    save_checkpoint(tmp_path / "a", model)
    assert is_checkpoint(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(GPT2Error, match="corrupt"):
        load_model(tmp_path / "a")
    save_checkpoint(tmp_path / "b", model)
    (tmp_path / "b" / "config.json").write_text(json.dumps({**model.config.to_dict(), "emb_dim": 32}))
    with pytest.raises(GPT2Error, match="does not match"):
        load_model(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text("{not json")
    with pytest.raises(GPT2Error, match="cannot read"):
        load_model(tmp_path / "b")
    (tmp_path / "file").write_text("x")
    with pytest.raises(GPT2Error, match="not a directory"):
        save_checkpoint(tmp_path / "file", model)
