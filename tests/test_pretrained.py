"""Loading Hugging Face / OpenAI GPT-2 files (gpt2/hf.py, gpt2/pretrained.py), with no network.

Every checkpoint here is built in the test: random tensors with the exact Hugging Face names,
dtypes and [in, out] Conv1D layouts, a tiny config.json, written with safetensors. The loaded
model's logits are compared with `reference_logits`, an independent NumPy transcription of
GPT2LMHeadModel's forward pass that reads the raw HF tensors.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import minigrad as mg
from gpt2.config import GPTConfig
from gpt2.errors import GPT2Error
from gpt2.generate import generate
from gpt2.model import GPTModel
from gpt2.pretrained import export_hf, load_pretrained

REPO = Path(__file__).resolve().parent.parent
TIKTOKEN_CACHE = REPO.parent / "shared" / "tiktoken_cache"

TINY = dict(vocab_size=61, n_positions=16, n_embd=16, n_head=2, n_layer=2)


# ---------------------------------------------------------------------------------------------
# No network in these tests
# ---------------------------------------------------------------------------------------------

class NetworkDisabled(urllib.error.URLError):
    pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Any download attempt fails (and is recorded); the default cache is a temp dir."""
    attempts = []

    def urlopen(url, *args, **kwargs):
        attempts.append(url if isinstance(url, str) else url.full_url)
        raise NetworkDisabled("network disabled in tests")

    def connect(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setenv("GPT2_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.delenv("GPT2_OFFLINE", raising=False)
    return attempts


# ---------------------------------------------------------------------------------------------
# Building checkpoints in the Hugging Face layout
# ---------------------------------------------------------------------------------------------

def hf_config(**overrides) -> dict:
    """A config.json as OpenAI's (field for field), shrunk to TINY."""
    d = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
         "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
         "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": TINY["n_positions"],
         "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
         "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
         "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, **TINY}
    d.update(overrides)
    return d


def hf_tensors(cfg: dict, seed=0, dtype=np.float32, prefix=True, buffers=False, lm_head=False) -> dict:
    """Random weights with GPT2LMHeadModel's names and layouts (written by hand, not via gpt2.hf)."""
    rng = np.random.default_rng(seed)
    V, T, C, L = cfg["vocab_size"], cfg["n_positions"], cfg["n_embd"], cfg["n_layer"]
    pre = "transformer." if prefix else ""

    def r(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    t = {f"{pre}wte.weight": r(V, C), f"{pre}wpe.weight": r(T, C, scale=0.1)}
    for i in range(L):
        h = f"{pre}h.{i}."
        t.update({
            h + "ln_1.weight": 1 + r(C, scale=0.1), h + "ln_1.bias": r(C, scale=0.1),
            h + "attn.c_attn.weight": r(C, 3 * C), h + "attn.c_attn.bias": r(3 * C, scale=0.1),
            h + "attn.c_proj.weight": r(C, C), h + "attn.c_proj.bias": r(C, scale=0.1),
            h + "ln_2.weight": 1 + r(C, scale=0.1), h + "ln_2.bias": r(C, scale=0.1),
            h + "mlp.c_fc.weight": r(C, 4 * C), h + "mlp.c_fc.bias": r(4 * C, scale=0.1),
            h + "mlp.c_proj.weight": r(4 * C, C), h + "mlp.c_proj.bias": r(C, scale=0.1),
        })
        if buffers:  # what older files (and OpenAI's hub conversion) carry
            t[h + "attn.bias"] = np.tril(np.ones((T, T), dtype=dtype))[None, None]
            t[h + "attn.masked_bias"] = np.array(-1e4, dtype=dtype)
    t[f"{pre}ln_f.weight"] = 1 + r(C, scale=0.1)
    t[f"{pre}ln_f.bias"] = r(C, scale=0.1)
    if lm_head:
        t["lm_head.weight"] = r(V, C)
    return t


def write_hf_dir(path: Path, tensors: dict, config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def tiny_dir(tmp_path):
    cfg = hf_config()
    return write_hf_dir(tmp_path / "tiny", hf_tensors(cfg), cfg)


# ---------------------------------------------------------------------------------------------
# The reference: GPT-2's forward pass in NumPy, straight from the HF tensors
# ---------------------------------------------------------------------------------------------

def reference_logits(t: dict, ids: np.ndarray, cfg: dict) -> np.ndarray:
    """GPT2LMHeadModel's logits for ids (B, T), from raw HF tensors (names with or without prefix)."""
    w = {k.removeprefix("transformer."): v.astype(np.float64) for k, v in t.items()}
    H, C, eps = cfg["n_head"], cfg["n_embd"], cfg.get("layer_norm_epsilon", 1e-5)
    D = C // H

    def ln(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

    def gelu_new(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    out = []
    for seq in ids:
        T = len(seq)
        x = w["wte.weight"][seq] + w["wpe.weight"][:T]
        for i in range(cfg["n_layer"]):
            p = f"h.{i}."
            a = ln(x, p + "ln_1") @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]   # (T, 3C)
            q, k, v = (a[:, j * C:(j + 1) * C].reshape(T, H, D).transpose(1, 0, 2) for j in range(3))
            s = q @ k.transpose(0, 2, 1) / math.sqrt(D)                                       # (H, T, T)
            s = np.where(np.triu(np.ones((T, T), bool), 1), -np.inf, s)
            att = np.exp(s - s.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            y = (att @ v).transpose(1, 0, 2).reshape(T, C)
            x = x + y @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
            m = gelu_new(ln(x, p + "ln_2") @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
            x = x + m @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
        head = w.get("lm_head.weight") if cfg.get("tie_word_embeddings") is False else w["wte.weight"]
        out.append(ln(x, "ln_f") @ head.T)
    return np.stack(out)


IDS = np.array([[3, 17, 60, 0, 5, 5, 42, 9, 1, 33, 12],
                [59, 2, 2, 8, 40, 11, 7, 0, 30, 21, 4]])


def read_file(path) -> dict:
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ---------------------------------------------------------------------------------------------
# Loading: logits equal the reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float64", 1e-10)])
@pytest.mark.parametrize("prefix,buffers", [(True, False), (False, True)],
                         ids=["transformer-prefix", "openai-names-with-mask-buffers"])
def test_logits_match_reference_forward(tmp_path, dtype, tol, prefix, buffers):
    cfg = hf_config()
    t = hf_tensors(cfg, dtype=np.dtype(dtype).type, prefix=prefix, buffers=buffers)
    model = load_pretrained(write_hf_dir(tmp_path / "m", t, cfg), dtype=dtype)
    assert not model.training  # eval mode, like from_pretrained
    assert model.config == GPTConfig(vocab_size=61, context_length=16, emb_dim=16, n_heads=2, n_layers=2,
                                     dropout=0.1, qkv_bias=True, tie_embeddings=True)
    assert all(p.dtype == np.dtype(dtype) for p in model.parameters())
    with mg.no_grad():
        logits = model(IDS).data
    ref = reference_logits(t, IDS, cfg)
    np.testing.assert_allclose(logits, ref, rtol=0, atol=tol * np.abs(ref).max())


def test_layout_mapping_is_the_documented_one(tiny_dir):
    """Spot-check the mapping: Conv1D weights are transposed, everything else copied."""
    t = read_file(tiny_dir / "model.safetensors")
    sd = load_pretrained(tiny_dir).state_dict()
    np.testing.assert_array_equal(sd["blocks.1.attn.qkv.weight"], t["transformer.h.1.attn.c_attn.weight"].T)
    np.testing.assert_array_equal(sd["blocks.1.attn.qkv.bias"], t["transformer.h.1.attn.c_attn.bias"])
    np.testing.assert_array_equal(sd["blocks.0.mlp.fc.weight"], t["transformer.h.0.mlp.c_fc.weight"].T)
    np.testing.assert_array_equal(sd["blocks.0.mlp.proj.weight"], t["transformer.h.0.mlp.c_proj.weight"].T)
    np.testing.assert_array_equal(sd["pos_emb.weight"], t["transformer.wpe.weight"])
    assert sd["blocks.0.attn.qkv.weight"].flags["C_CONTIGUOUS"]
    assert len(sd) == 4 + 2 * 12  # tied: no head.weight


def test_tied_head_and_ignored_lm_head(tmp_path):
    """A tied model's logits use wte; an lm_head.weight stored beside it is ignored (as transformers)."""
    cfg = hf_config()
    t = hf_tensors(cfg, lm_head=True)
    model = load_pretrained(write_hf_dir(tmp_path / "m", t, cfg))
    assert model.head is None and model.config.tie_embeddings
    np.testing.assert_allclose(model(IDS).data, reference_logits(t, IDS, cfg), atol=1e-5)


def test_untied_head_is_loaded(tmp_path):
    cfg = hf_config(tie_word_embeddings=False)
    t = hf_tensors(cfg, lm_head=True)
    model = load_pretrained(write_hf_dir(tmp_path / "m", t, cfg))
    assert not model.config.tie_embeddings
    np.testing.assert_array_equal(model.head.weight.data, t["lm_head.weight"])
    np.testing.assert_allclose(model(IDS).data, reference_logits(t, IDS, cfg), atol=1e-5)


def test_layer_norm_epsilon_is_honoured(tmp_path):
    cfg = hf_config(layer_norm_epsilon=0.5)
    t = hf_tensors(cfg)
    model = load_pretrained(write_hf_dir(tmp_path / "m", t, cfg), dtype="float64")
    np.testing.assert_allclose(model(IDS).data, reference_logits(t, IDS, cfg), atol=1e-10)
    export_hf(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["layer_norm_epsilon"] == 0.5


# ---------------------------------------------------------------------------------------------
# Export, and export -> load round trips
# ---------------------------------------------------------------------------------------------

def test_load_export_round_trip_is_exact(tmp_path):
    cfg = hf_config()
    t = hf_tensors(cfg, prefix=False, buffers=True)   # OpenAI's hub style in ...
    src = write_hf_dir(tmp_path / "src", t, cfg)
    out = export_hf(load_pretrained(src), tmp_path / "out")
    written = read_file(out / "model.safetensors")     # ... save_pretrained style out
    expected = {"transformer." + k: v for k, v in t.items() if not k.endswith((".attn.bias", "masked_bias"))}
    assert set(written) == set(expected)
    for k, v in expected.items():
        assert written[k].dtype == v.dtype and written[k].shape == v.shape, k
        np.testing.assert_array_equal(written[k], v, err_msg=k)
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}       # transformers refuses files without a format
    c = json.loads((out / "config.json").read_text())
    for key in ("vocab_size", "n_positions", "n_ctx", "n_embd", "n_head", "n_layer", "layer_norm_epsilon",
                "activation_function", "model_type", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        assert c[key] == cfg[key], key
    assert c["architectures"] == ["GPT2LMHeadModel"] and c["tie_word_embeddings"] is True
    assert not list(out.glob("*.part"))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("qkv_bias,tie", [(True, True), (False, False), (False, True), (True, False)])
def test_export_load_round_trip_of_our_models(tmp_path, dtype, qkv_bias, tie):
    mg.set_default_dtype(np.dtype(dtype).type)
    config = GPTConfig(vocab_size=37, context_length=8, emb_dim=12, n_heads=3, n_layers=2, dropout=0.1,
                       qkv_bias=qkv_bias, tie_embeddings=tie)
    model = GPTModel(config)
    for p in model.parameters():  # move biases and LN parameters away from 0 and 1
        p.data = p.data + mg.backend.rng().normal(p.shape, std=0.1)
    out = export_hf(model, tmp_path / "out")
    files = read_file(out / "model.safetensors")
    C = config.emb_dim
    assert files["transformer.h.0.attn.c_attn.weight"].shape == (C, 3 * C)
    assert files["transformer.h.0.attn.c_attn.weight"].dtype == np.dtype(dtype)
    if not qkv_bias:
        np.testing.assert_array_equal(files["transformer.h.1.attn.c_attn.bias"], np.zeros(3 * C))
    assert ("lm_head.weight" in files) == (not tie)
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["tie_word_embeddings"] is tie
    back = load_pretrained(out, dtype=dtype)
    assert back.config == config
    for (n, a), (n2, b) in zip(model.named_parameters(), back.named_parameters()):
        assert n == n2 and a.dtype == b.dtype
        np.testing.assert_array_equal(a.data, b.data, err_msg=n)
    model.eval()
    ids = IDS[:, :8] % 37
    np.testing.assert_array_equal(model(ids).data, back(ids).data)
    # ... and the reference forward computes the same logits from the exported files
    ref = reference_logits(files, ids, hf_cfg)
    np.testing.assert_allclose(back(ids).data, ref, atol=1e-5 * np.abs(ref).max())


def test_trained_zero_qkv_bias_becomes_a_bias(tmp_path):
    """A model exported without qkv bias whose (zero) biases were later trained elsewhere keeps them."""
    model = GPTModel(GPTConfig(vocab_size=37, context_length=8, emb_dim=12, n_heads=3, n_layers=1,
                               qkv_bias=False))
    out = export_hf(model, tmp_path / "out")
    t = read_file(out / "model.safetensors")
    t["transformer.h.0.attn.c_attn.bias"] += 0.5
    save_file(t, str(out / "model.safetensors"))
    back = load_pretrained(out)
    assert back.config.qkv_bias
    np.testing.assert_array_equal(back.blocks[0].attn.qkv.bias.data, np.full(36, 0.5, np.float32))


def test_export_to_float32_and_bad_arguments(tmp_path):
    mg.set_default_dtype(np.float64)
    model = GPTModel(GPTConfig(vocab_size=11, context_length=4, emb_dim=4, n_heads=1, n_layers=1))
    out = export_hf(model, tmp_path / "f32", dtype="float32")
    assert read_file(out / "model.safetensors")["transformer.wte.weight"].dtype == np.float32
    with pytest.raises(GPT2Error, match="GPTModel"):
        export_hf(object(), tmp_path / "x")
    with pytest.raises(GPT2Error, match="dtype"):
        load_pretrained(out, dtype="int8")


# ---------------------------------------------------------------------------------------------
# Errors: one GPT2Error naming the tensor (or file, or field)
# ---------------------------------------------------------------------------------------------

def test_missing_tensor(tmp_path):
    cfg = hf_config()
    t = hf_tensors(cfg)
    del t["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(GPT2Error, match=r"missing tensor 'transformer\.h\.1\.mlp\.c_fc\.bias'"):
        load_pretrained(write_hf_dir(tmp_path / "m", t, cfg))


def test_missing_untied_head(tmp_path):
    cfg = hf_config(tie_word_embeddings=False)
    with pytest.raises(GPT2Error, match=r"missing tensor 'lm_head\.weight'.*tie_word_embeddings"):
        load_pretrained(write_hf_dir(tmp_path / "m", hf_tensors(cfg), cfg))


def test_wrong_shape(tmp_path):
    cfg = hf_config()
    t = hf_tensors(cfg, prefix=False)
    t["h.0.attn.c_attn.weight"] = np.ascontiguousarray(t["h.0.attn.c_attn.weight"].T)  # (3C, C): not Conv1D
    with pytest.raises(GPT2Error, match=r"'h\.0\.attn\.c_attn\.weight'.*\(48, 16\).*\(16, 48\)"):
        load_pretrained(write_hf_dir(tmp_path / "m", t, cfg))


def test_unexpected_tensor(tmp_path):
    cfg = hf_config()
    t = hf_tensors(cfg)
    t["transformer.h.0.attn.rotary.weight"] = np.zeros(3, np.float32)
    with pytest.raises(GPT2Error, match=r"unexpected tensor 'transformer\.h\.0\.attn\.rotary\.weight'"):
        load_pretrained(write_hf_dir(tmp_path / "m", t, cfg))


@pytest.mark.parametrize("field,value,pattern", [
    ("n_embd", 32, r"'transformer\.wte\.weight'.*\(61, 16\).*n_embd=32.*\(61, 32\)"),
    ("vocab_size", 50257, r"'transformer\.wte\.weight'.*vocab_size=50257"),
    ("n_positions", 1024, r"'transformer\.wpe\.weight'.*\(16, 16\).*n_positions=1024"),
    ("n_layer", 1, r"unexpected tensor 'transformer\.h\.1\..*n_layer=1.*disagree"),
    ("n_layer", 3, r"missing tensor 'transformer\.h\.2\.ln_1\.weight'.*n_layer=3"),
])
def test_config_disagrees_with_tensors(tmp_path, field, value, pattern):
    t = hf_tensors(hf_config())
    with pytest.raises(GPT2Error, match=pattern):
        load_pretrained(write_hf_dir(tmp_path / "m", t, hf_config(**{field: value})))


def test_truncated_file_names_the_tensor(tiny_dir):
    path = tiny_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1])  # an interrupted copy: the tensor stored last is one byte short
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    header.pop("__metadata__")
    last = max(header, key=lambda name: header[name]["data_offsets"][1])
    with pytest.raises(GPT2Error, match=rf"truncated: tensor '{last}'.*download it again"):
        load_pretrained(tiny_dir)
    path.write_bytes(data[:5])
    with pytest.raises(GPT2Error, match="not a safetensors file"):
        load_pretrained(tiny_dir)


@pytest.mark.parametrize("overrides,pattern", [
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"n_inner": 7}, "n_inner=7"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"n_head": 5}, "divisible"),
    ({"n_embd": None}, "no 'n_embd' field"),
    ({"layer_norm_epsilon": -1}, "layer_norm_epsilon"),
])
def test_unsupported_configs(tmp_path, overrides, pattern):
    t = hf_tensors(hf_config())
    cfg = {k: v for k, v in hf_config(**overrides).items() if v is not None}
    with pytest.raises(GPT2Error, match=pattern):
        load_pretrained(write_hf_dir(tmp_path / "m", t, cfg))


def test_bad_directories(tmp_path):
    with pytest.raises(GPT2Error, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GPT2Error, match="cannot read"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(GPT2Error, match="no model.safetensors.*pytorch_model.bin.*pickle"):
        load_pretrained(tmp_path)
    with pytest.raises(GPT2Error, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    with pytest.raises(GPT2Error, match="is a file"):
        load_pretrained(tmp_path / "config.json")


def test_our_own_checkpoint_is_pointed_to_checkpoint_loading(tmp_path):
    (tmp_path / "config.json").write_text(GPTConfig().to_json())
    with pytest.raises(GPT2Error, match="--checkpoint"):
        load_pretrained(tmp_path)


def test_non_finite_weights(tmp_path):
    cfg = hf_config()
    t = hf_tensors(cfg)
    t["transformer.h.0.ln_2.bias"][3] = np.nan
    with pytest.raises(GPT2Error, match=r"'transformer\.h\.0\.ln_2\.bias'.*NaN"):
        load_pretrained(write_hf_dir(tmp_path / "m", t, cfg))


def test_unsupported_tensor_dtype(tmp_path):
    cfg = hf_config()
    t = hf_tensors(cfg)
    t["transformer.ln_f.bias"] = t["transformer.ln_f.bias"].astype(np.int32)
    with pytest.raises(GPT2Error, match=r"'transformer\.ln_f\.bias'.*dtype I32"):
        load_pretrained(write_hf_dir(tmp_path / "m", t, cfg))


def test_float16_files_load(tmp_path):
    cfg = hf_config()
    t = hf_tensors(cfg, dtype=np.float16)
    model = load_pretrained(write_hf_dir(tmp_path / "m", t, cfg))
    assert model.tok_emb.weight.dtype == np.float32
    np.testing.assert_allclose(model(IDS).data, reference_logits(t, IDS, cfg), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Names, the cache and downloading
# ---------------------------------------------------------------------------------------------

def populate_cache(cache: Path, name="gpt2") -> Path:
    cfg = hf_config()
    return write_hf_dir(cache / name, hf_tensors(cfg, prefix=False, buffers=True), cfg)


def test_cached_files_are_not_downloaded_again(tmp_path, no_network, monkeypatch):
    populate_cache(tmp_path / "cache")
    model = load_pretrained("gpt2", cache_dir=tmp_path / "cache")
    assert model.config.emb_dim == 16 and no_network == []
    # the same through $GPT2_CACHE, and through the names' aliases
    monkeypatch.setenv("GPT2_CACHE", str(tmp_path / "cache"))
    for name in ("gpt2", "openai-community/gpt2", "gpt2-124m"):
        load_pretrained(name)
    assert no_network == []


def test_offline_error_says_what_to_download_and_where(tmp_path, no_network):
    with pytest.raises(GPT2Error) as err:
        load_pretrained("gpt2-medium", cache_dir=tmp_path / "c")
    msg = str(err.value)
    assert "https://huggingface.co/openai-community/gpt2-medium/resolve/main/config.json" in msg
    assert "https://huggingface.co/openai-community/gpt2-medium/resolve/main/model.safetensors" in msg
    assert str(tmp_path / "c" / "gpt2-medium") in msg and "network disabled" in msg
    assert no_network == ["https://huggingface.co/openai-community/gpt2-medium/resolve/main/config.json"]
    assert not list((tmp_path / "c").rglob("*.part"))


def test_gpt2_offline_makes_no_attempt(tmp_path, no_network, monkeypatch):
    monkeypatch.setenv("GPT2_OFFLINE", "1")
    with pytest.raises(GPT2Error, match="GPT2_OFFLINE.*model.safetensors"):
        load_pretrained("gpt2-xl", cache_dir=tmp_path)
    assert no_network == []


def test_leftover_part_file_is_not_treated_as_complete(tmp_path, no_network):
    """An interrupted download leaves model.safetensors.part: loading must download again."""
    d = populate_cache(tmp_path)
    (d / "model.safetensors").rename(d / "model.safetensors.part")
    with pytest.raises(GPT2Error, match="could not download"):
        load_pretrained("gpt2", cache_dir=tmp_path)
    assert no_network == ["https://huggingface.co/openai-community/gpt2/resolve/main/model.safetensors"]
    assert not (d / "model.safetensors").exists()


class FakeResponse:
    """What urlopen returns, serving `data`; optionally dies after `fail_after` bytes."""

    def __init__(self, data: bytes, fail_after=None, length=None):
        self.data, self.pos, self.fail_after = data, 0, fail_after
        self.headers = {"Content-Length": str(len(data) if length is None else length)}

    def read(self, n):
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        chunk = self.data[self.pos:self.pos + min(n, 1000)]
        self.pos += len(chunk)
        return chunk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_is_atomic_and_happens_once(tmp_path, monkeypatch):
    served = populate_cache(tmp_path / "server")
    calls = []
    fail = {"model.safetensors": 3000}

    def urlopen(url, timeout=None):
        calls.append(url)
        name = url.rsplit("/", 1)[1]
        return FakeResponse((served / name).read_bytes(), fail_after=fail.get(name))

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    cache = tmp_path / "cache"
    # 1. The connection dies mid-file: no model.safetensors (nor a .part) is left behind.
    with pytest.raises(GPT2Error, match="could not download.*connection reset"):
        load_pretrained("gpt2", cache_dir=cache)
    assert (cache / "gpt2" / "config.json").is_file()
    assert sorted(p.name for p in (cache / "gpt2").iterdir()) == ["config.json"]
    # 2. The retry fetches only the missing file, completely.
    fail.clear()
    calls.clear()
    model = load_pretrained("gpt2", cache_dir=cache, dtype="float64")
    assert [u.rsplit("/", 1)[1] for u in calls] == ["model.safetensors"]
    assert (cache / "gpt2" / "model.safetensors").read_bytes() == (served / "model.safetensors").read_bytes()
    assert model.tok_emb.weight.dtype == np.float64
    # 3. Never twice.
    calls.clear()
    load_pretrained("gpt2", cache_dir=cache)
    assert calls == []


def test_short_download_is_rejected(tmp_path, monkeypatch):
    served = populate_cache(tmp_path / "server")
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(
        (served / url.rsplit("/", 1)[1]).read_bytes()[:100], length=10**6))
    with pytest.raises(GPT2Error, match="stopped after 100 of 1,000,000 bytes"):
        load_pretrained("gpt2", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "gpt2" / "config.json").exists()


def test_unknown_model_name():
    with pytest.raises(GPT2Error, match=r"unknown pretrained model 'gpt3'.*gpt2, gpt2-medium, gpt2-large, "
                                        r"gpt2-xl.*directory"):
        load_pretrained("gpt3")


def test_names_take_precedence_over_a_directory_called_gpt2(tmp_path, monkeypatch, no_network):
    """Run from the repository root, "gpt2" is also the package directory: it means the model."""
    monkeypatch.chdir(REPO)
    with pytest.raises(GPT2Error, match="could not download"):
        load_pretrained("gpt2", cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# The loaded model: generation with and without the KV cache, gradients
# ---------------------------------------------------------------------------------------------

def test_cached_and_uncached_generation_agree(tiny_dir):
    model = load_pretrained(tiny_dir, dtype="float64")
    prompt = IDS[:, :5]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_k=10, seed=3)):
        a = generate(model, prompt, 30, use_cache=True, **kw)   # 35 tokens > 16 positions
        b = generate(model, prompt, 30, use_cache=False, **kw)
        np.testing.assert_array_equal(a, b)


def test_whole_model_gradient_check_float64(tmp_path):
    """Every parameter of a loaded model gets the right gradient of the cross-entropy loss."""
    cfg = hf_config(vocab_size=11, n_positions=6, n_embd=4, n_head=2, n_layer=1, n_ctx=6)
    model = load_pretrained(write_hf_dir(tmp_path / "m", hf_tensors(cfg), cfg), dtype="float64")
    params = model.parameters()
    ids = np.array([[1, 4, 9, 2, 2, 7], [0, 3, 10, 5, 6, 1]])
    targets = np.array([[4, 9, 2, 2, 7, 8], [3, 10, 5, 6, 1, 0]])
    assert mg.gradcheck(lambda *_: mg.F.cross_entropy(model(ids), targets), *params, atol=1e-7, rtol=1e-5)


def test_loading_keeps_the_seeded_random_stream(tiny_dir):
    """Loading draws no random numbers, so a seeded run is the same with or without it."""
    mg.manual_seed(7)
    a = mg.backend.rng().random((5,))
    mg.manual_seed(7)
    load_pretrained(tiny_dir)
    np.testing.assert_array_equal(mg.backend.rng().random((5,)), a)


# ---------------------------------------------------------------------------------------------
# The CLI and the chapter, on a tiny model with GPT-2's vocabulary (so the tokenizer fits it)
# ---------------------------------------------------------------------------------------------

needs_vocab = pytest.mark.skipif(not TIKTOKEN_CACHE.is_dir() and "TIKTOKEN_CACHE_DIR" not in os.environ,
                                 reason="no offline tiktoken vocabulary (../shared/tiktoken_cache)")


@pytest.fixture
def tiny_vocab_dir(tmp_path):
    cfg = hf_config(vocab_size=50257, n_embd=8, n_head=2, n_layer=1, n_positions=32, n_ctx=32)
    return write_hf_dir(tmp_path / "tiny-gpt2", hf_tensors(cfg, prefix=False, buffers=True), cfg)


def _env(tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg", "GPT2_OFFLINE": "1", "GPT2_CACHE": str(tmp_path / "nocache")}
    if TIKTOKEN_CACHE.is_dir():
        env.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    return env


def _cli(*args, env):
    return subprocess.run([sys.executable, "-m", "gpt2", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


@needs_vocab
def test_cli_generate_pretrained(tmp_path, tiny_vocab_dir):
    env = _env(tmp_path)
    base = ["generate", "--pretrained", str(tiny_vocab_dir), "--prompt", "Every effort moves you",
            "--max-new-tokens", "40"]   # 5 + 40 tokens > 32 positions: the window slides
    cached = _cli(*base, env=env)
    assert cached.returncode == 0, cached.stderr
    assert cached.stdout.strip().startswith("Every effort moves you")
    uncached = _cli(*base, "--no-cache", env=env)
    assert uncached.returncode == 0, uncached.stderr
    assert uncached.stdout == cached.stdout
    missing = _cli("generate", "--pretrained", "gpt2-large", "--prompt", "Hi", "--cache-dir",
                   str(tmp_path / "c"), env=env)
    assert missing.returncode == 2
    assert "gpt2-large/resolve/main/model.safetensors" in missing.stderr
    assert "Traceback" not in missing.stderr


@needs_vocab
def test_chapter_06_with_local_weights(tmp_path, tiny_vocab_dir):
    """The chapter's full path (weights present), on a tiny stand-in for GPT-2 124M."""
    chapter = REPO / "chapters" / "06_pretrained.py"
    env = {**_env(tmp_path), "GPT2_PRETRAINED_DIR": str(tiny_vocab_dir), "GPT2_CHAPTER_QUICK": "1"}
    result = subprocess.run([sys.executable, str(chapter)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tokens/s" in result.stdout and "Loaded" in result.stdout
