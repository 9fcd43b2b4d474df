"""The KV cache (gpt2/model.py KVCache, gpt2/generate.py use_cache=True).

Generation with the cache must give exactly the tokens of recomputing the whole (cropped) context
for every new token: greedy and seeded sampling, batches, eos handling, prompts longer than the
context, and generation past the context length (where the cached path falls back to
recomputing the sliding window).
"""

from __future__ import annotations

import numpy as np
import pytest

import minigrad as mg
from gpt2.config import GPTConfig
from gpt2.errors import GPT2Error
from gpt2.generate import generate
from gpt2.model import GPTModel

# Every test here runs on NumPy and on CuPy (a real GPU, or the strict CPU stand-in).
pytestmark = pytest.mark.usefixtures("backend")

CTX = 12


def make_model(dtype=np.float64, **overrides) -> GPTModel:
    mg.set_default_dtype(dtype)
    mg.manual_seed(0)
    cfg = dict(vocab_size=29, context_length=CTX, emb_dim=16, n_heads=4, n_layers=2, dropout=0.1)
    model = GPTModel(GPTConfig(**{**cfg, **overrides}))
    for p in model.parameters():   # larger weights than GPT-2's init: sharper, more varied logits
        p.data = p.data + mg.backend.rng().normal(p.shape, std=0.5)
    return model


def naive_greedy(model, ids: np.ndarray, n: int) -> np.ndarray:
    """The definition: run the model on the last CTX tokens, take the argmax, append, repeat."""
    model.eval()
    with mg.no_grad():
        for _ in range(n):
            logits = model(ids[:, -model.config.context_length:]).data[:, -1]
            ids = np.concatenate([ids, mg.to_numpy(logits.argmax(-1))[:, None]], axis=1)
    return ids


def prompt(B: int, T: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 29, size=(B, T))


@pytest.mark.parametrize("T", [1, 5, CTX - 1, CTX, CTX + 7])
def test_greedy_equals_recomputing_the_context(T):
    """Prompts shorter than, equal to and longer than the context; 2.5 contexts of new tokens."""
    model = make_model()
    ids = prompt(2, T)
    n = 30
    expected = naive_greedy(model, ids, n)
    cached = generate(model, ids, n, use_cache=True)
    uncached = generate(model, ids, n, use_cache=False)
    np.testing.assert_array_equal(uncached, expected)
    np.testing.assert_array_equal(cached, expected)
    assert cached.shape == (2, T + n)
    assert len(np.unique(cached[:, T:])) > 3  # a real test: the model does not repeat one token


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                dict(temperature=1.3, top_p=0.8), dict(temperature=1.0, top_k=8, top_p=0.9)])
@pytest.mark.parametrize("T", [3, CTX + 2])
def test_seeded_sampling_equals_recomputing_the_context(kw, T):
    model = make_model()
    ids = prompt(3, T, seed=2)
    a = generate(model, ids, 27, seed=123, use_cache=True, **kw)
    b = generate(model, ids, 27, seed=123, use_cache=False, **kw)
    np.testing.assert_array_equal(a, b)
    c = generate(model, ids, 27, seed=124, use_cache=True, **kw)
    assert not np.array_equal(a, c)  # the seed matters, so the equality above means something


def test_float32_greedy_and_sampling():
    model = make_model(np.float32)
    ids = prompt(2, 4)
    np.testing.assert_array_equal(generate(model, ids, 25, use_cache=True), naive_greedy(model, ids, 25))
    np.testing.assert_array_equal(generate(model, ids, 25, temperature=1.0, top_k=6, seed=5),
                                  generate(model, ids, 25, temperature=1.0, top_k=6, seed=5, use_cache=False))


def test_untied_model_without_qkv_bias():
    model = make_model(qkv_bias=False, tie_embeddings=False)
    ids = prompt(1, 6)
    np.testing.assert_array_equal(generate(model, ids, 20), naive_greedy(model, ids, 20))


def test_eos_stops_both_paths_alike():
    model = make_model()
    ids = prompt(3, 4, seed=3)
    free = generate(model, ids, 20, temperature=1.0, seed=9)
    eos = int(free[0, 6])  # a token row 0 is known to produce
    a = generate(model, ids, 20, temperature=1.0, seed=9, eos_id=eos, use_cache=True)
    b = generate(model, ids, 20, temperature=1.0, seed=9, eos_id=eos, use_cache=False)
    np.testing.assert_array_equal(a, b)


def test_one_dimensional_prompt_and_zero_new_tokens():
    model = make_model()
    ids = prompt(1, 5)[0]
    out = generate(model, ids, 10)
    assert out.shape == (15,)
    np.testing.assert_array_equal(out, naive_greedy(model, ids[None], 10)[0])
    np.testing.assert_array_equal(generate(model, ids, 0), ids)


def test_cached_logits_equal_full_forward_logits():
    """Prefill then one-token steps give every position's logits as one full forward pass does."""
    model = make_model().eval()
    ids = prompt(2, CTX)
    with mg.no_grad():
        full = model(ids).numpy()
        cache = model.new_cache(2)
        steps = [model(ids[:, :5], cache).numpy()]
        assert cache.length == 5
        for t in range(5, CTX):
            steps.append(model(ids[:, t:t + 1], cache).numpy())
        assert cache.length == CTX
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-12)


def test_chunked_prefill():
    """Feeding a cache several tokens at a time (not just 1) is also exact."""
    model = make_model().eval()
    ids = prompt(1, CTX)
    with mg.no_grad():
        full = model(ids).numpy()
        cache = model.new_cache(1)
        parts = [model(ids[:, a:b], cache).numpy() for a, b in ((0, 3), (3, 4), (4, 9), (9, CTX))]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=0, atol=1e-12)


def test_cache_overflow_is_a_clear_error():
    model = make_model().eval()
    cache = model.new_cache(1)
    with mg.no_grad():
        model(prompt(1, CTX - 1), cache)
        with pytest.raises(GPT2Error, match="longer than the model's context length"):
            model(prompt(1, 2), cache)
        cache.reset()
        assert model(prompt(1, CTX), cache).shape == (1, CTX, 29)


def test_cache_matches_model_dtype_and_generation_restores_training_mode():
    model = make_model(np.float32)
    assert model.new_cache(1).keys[0].dtype == np.float32
    model.train()
    generate(model, prompt(1, 3), 3)
    assert model.training
    model.eval()
    generate(model, prompt(1, 3), 3)
    assert not model.training


def test_dropout_model_generates_deterministically():
    """Generation runs in eval mode: dropout (p=0.1 here) never changes the tokens."""
    model = make_model().train()
    ids = prompt(1, 4)
    np.testing.assert_array_equal(generate(model, ids, 15), generate(model, ids, 15))
