"""gpt2.config and gpt2.model: parameter counts, the whole-model gradient, causality, the KV cache."""

from __future__ import annotations

import numpy as np
import pytest
from gpt2_helpers import tiny_config, tiny_model

import minigrad as mg
from gpt2 import GPT2Error, GPTModel, config_for, course_config
from gpt2.model import model_memory_bytes
from minigrad import functional as F

# Every test here runs on NumPy and on CuPy (a real GPU, or the strict CPU stand-in).
pytestmark = pytest.mark.usefixtures("backend")

# ---------------------------------------------------------------------------------------------
# parameter counts
# ---------------------------------------------------------------------------------------------

OPENAI_COUNTS = {
    "gpt2-124m": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


@pytest.mark.parametrize("name", list(OPENAI_COUNTS))
def test_parameter_counts_of_the_four_sizes(name):
    config = config_for(name)
    assert config.num_parameters() == OPENAI_COUNTS[name]
    assert model_memory_bytes(config) == 4 * OPENAI_COUNTS[name]   # float32


def test_course_config_count():
    # GPT-2 small, plus an untied head (+ V*C), minus the qkv biases (3C per block) and the
    # positions 256..1023 of the position embedding
    cfg = course_config()
    expected = 124_439_808 + 50257 * 768 - 12 * 3 * 768 - (1024 - 256) * 768
    assert cfg.num_parameters() == expected == 162_419_712


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_config_count_equals_a_real_model(tie, qkv_bias):
    model = tiny_model(tie_embeddings=tie, qkv_bias=qkv_bias)
    assert model.num_parameters() == model.config.num_parameters()
    names = [n for n, _ in model.named_parameters()]
    assert ("head.weight" in names) != tie
    assert ("blocks.0.attn.qkv.bias" in names) == qkv_bias


def test_unknown_size_and_bad_config():
    with pytest.raises(GPT2Error, match="unknown model size"):
        config_for("gpt3")
    with pytest.raises(GPT2Error, match="divisible"):
        tiny_config(emb_dim=10, n_heads=3)
    with pytest.raises(GPT2Error, match="positive"):
        tiny_config(n_layers=0)


# ---------------------------------------------------------------------------------------------
# the whole model's gradient, against finite differences
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_whole_model_gradcheck_float64(tie):
    """Every parameter of a small GPT, through embeddings, attention, MLP, layer norms and
    cross-entropy, gets the gradient that central differences give."""
    mg.set_default_dtype(np.float64)
    mg.manual_seed(0)
    config = tiny_config(vocab_size=13, context_length=5, emb_dim=4, n_heads=2, n_layers=2,
                         dropout=0.0, tie_embeddings=tie)
    model = GPTModel(config)
    # Larger weights than GPT-2's 0.02 make every path matter in the finite differences.
    rng = np.random.default_rng(1)
    for p in model.parameters():
        p.data = p.data + mg.backend.asarray(0.3 * rng.standard_normal(p.shape))
    model.eval()   # dropout off (it is 0 anyway): the function must be deterministic
    ids = rng.integers(0, 13, size=(2, 5))
    targets = rng.integers(0, 13, size=(2, 5))
    params = model.parameters()
    assert all(p.dtype == np.float64 for p in params)
    assert mg.gradcheck(lambda *ps: F.cross_entropy(model(ids), targets), *params,
                        eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# behaviour
# ---------------------------------------------------------------------------------------------


def test_logits_shape_and_dtype():
    model = tiny_model()
    logits = model(np.zeros((3, 7), dtype=np.int64))
    assert logits.shape == (3, 7, 64) and logits.dtype == np.float32


def test_attention_is_causal():
    """Changing a later token never changes the logits of an earlier position."""
    model = tiny_model().eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, size=(2, 12))
    base = model(ids).numpy()
    for t in (0, 5, 11):
        changed = ids.copy()
        changed[:, t] = (changed[:, t] + 17) % 64
        out = model(changed).numpy()
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert not np.allclose(out[:, t:], base[:, t:])   # ... while it does change its own position


def test_dropout_in_train_mode_only():
    model = tiny_model(dropout=0.5)
    ids = np.arange(10)[None] % 64
    a, b = model(ids).numpy(), model(ids).numpy()
    assert not np.allclose(a, b)             # training: a fresh dropout mask each call
    model.eval()
    np.testing.assert_array_equal(model(ids).numpy(), model(ids).numpy())


def test_same_seed_same_weights():
    a, b = tiny_model(seed=5), tiny_model(seed=5)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy(), err_msg=name)
    assert not np.array_equal(a.tok_emb.weight.numpy(), tiny_model(seed=6).tok_emb.weight.numpy())


def test_gpt2_initialisation():
    model = tiny_model(n_layers=4, emb_dim=64, n_heads=4)
    w = model.blocks[0].mlp.fc.weight.data
    assert abs(w.std() - 0.02) < 0.003
    resid = model.blocks[0].mlp.proj.weight.data
    assert abs(resid.std() - 0.02 / np.sqrt(2 * 4)) < 0.002   # scaled residual projections
    assert (model.blocks[0].ln1.weight.data == 1).all() and (model.blocks[0].mlp.fc.bias.data == 0).all()


def test_kv_cache_gives_the_same_logits():
    model = tiny_model().eval()
    ids = np.random.default_rng(0).integers(0, 64, size=(2, 10))
    full = model(ids).numpy()
    cache = model.new_cache(2)
    with mg.no_grad():
        first = model(ids[:, :6], cache).numpy()          # prefill 6 tokens
        steps = [model(ids[:, t:t + 1], cache).numpy() for t in range(6, 10)]   # then one at a time
    np.testing.assert_allclose(first, full[:, :6], atol=1e-5)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full[:, 6:], atol=1e-5)


@pytest.mark.parametrize("use_cache", [False, True])
def test_last_only_gives_the_last_positions_logits(use_cache):
    # generation asks for the last position only: the final layer norm and the head run on it alone
    model = tiny_model().eval()
    ids = np.random.default_rng(1).integers(0, 64, size=(2, 9))
    with mg.no_grad():
        full = model(ids, model.new_cache(2) if use_cache else None).numpy()
        last = model(ids, model.new_cache(2) if use_cache else None, last_only=True).numpy()
    assert last.shape == (2, 1, full.shape[-1])
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_clear_errors():
    model = tiny_model()
    with pytest.raises(GPT2Error, match="context length"):
        model(np.zeros((1, 17), dtype=np.int64))
    with pytest.raises(GPT2Error, match="outside the vocabulary"):
        model(np.array([[1, 64]]))
    with pytest.raises(GPT2Error, match="integers"):
        model(np.array([[1.0, 2.0]]))


def test_tiny_model_overfits_a_short_text():
    """The whole training step (forward, cross-entropy, backward, AdamW) can drive the loss of a
    short fixed sequence close to zero."""
    from gpt2.train import make_optimizer

    model = tiny_model(vocab_size=32, context_length=16, emb_dim=32, n_heads=2, n_layers=2)
    rng = np.random.default_rng(0)
    seq = rng.integers(0, 32, size=(4, 17))            # 4 random sequences to memorise
    x, y = seq[:, :-1], seq[:, 1:]
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.0                              # ~ln(32) = 3.47 at the start
    assert losses[-1] < 0.1, losses[-1]
