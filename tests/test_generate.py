"""gpt2.generate: greedy and sampled decoding, seeds, top-k / top-p, eos, and the KV cache."""

from __future__ import annotations

import numpy as np
import pytest
from gpt2_helpers import tiny_model

import minigrad as mg
from gpt2 import GPT2Error, generate
from gpt2.generate import next_token

# Every test here runs on NumPy and on CuPy (a real GPU, or the strict CPU stand-in).
pytestmark = pytest.mark.usefixtures("backend")


@pytest.fixture
def model(backend):
    """Built on the backend under test (weights live where the computation runs)."""
    m = tiny_model(seed=3, vocab_size=50, context_length=12, emb_dim=16, n_heads=2, n_layers=2,
                   dropout=0.1)
    # Larger weights than GPT-2's init make the next-token distribution far from uniform.
    rng = np.random.default_rng(0)
    for p in m.parameters():
        p.data = p.data + mg.backend.asarray(0.3 * rng.standard_normal(p.shape), dtype=np.float32)
    return m


PROMPT = np.array([[1, 2, 3, 4]])


def test_greedy_is_deterministic_and_appends(model):
    a = generate(model, PROMPT, max_new_tokens=6)
    b = generate(model, PROMPT, max_new_tokens=6)
    assert a.shape == (1, 10) and (a[:, :4] == PROMPT).all()
    np.testing.assert_array_equal(a, b)
    assert model.training   # generate restores the mode it found (dropout is off inside)


def test_greedy_picks_the_argmax(model):
    out = generate(model, PROMPT, max_new_tokens=1)
    model.eval()
    expected = model(PROMPT).numpy()[0, -1].argmax()
    model.train()
    assert out[0, -1] == expected


def test_top_k_1_equals_greedy(model):
    greedy = generate(model, PROMPT, max_new_tokens=8)
    for seed in (0, 1, 2):
        np.testing.assert_array_equal(
            generate(model, PROMPT, 8, temperature=1.5, top_k=1, seed=seed), greedy)


def test_tiny_top_p_equals_greedy(model):
    greedy = generate(model, PROMPT, max_new_tokens=8)
    np.testing.assert_array_equal(generate(model, PROMPT, 8, temperature=1.0, top_p=1e-9, seed=4), greedy)


def test_seeds_reproduce_and_differ(model):
    a = generate(model, PROMPT, 10, temperature=2.0, seed=11)
    b = generate(model, PROMPT, 10, temperature=2.0, seed=11)
    np.testing.assert_array_equal(a, b)
    others = [generate(model, PROMPT, 10, temperature=2.0, seed=s) for s in range(12, 16)]
    assert any(not np.array_equal(a, o) for o in others)


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.0, top_k=5, seed=7),
                                      dict(temperature=0.8, top_p=0.9, seed=8)])
def test_kv_cache_equals_no_cache(model, sampling):
    # 4 + 15 tokens > context 12: also covers cropping once the context is full.
    with_cache = generate(model, PROMPT, 15, use_cache=True, **sampling)
    without = generate(model, PROMPT, 15, use_cache=False, **sampling)
    np.testing.assert_array_equal(with_cache, without)


def test_batch_of_prompts_and_1d_prompt(model):
    prompts = np.array([[1, 2, 3], [4, 5, 6]])
    out = generate(model, prompts, 5)
    assert out.shape == (2, 8)
    np.testing.assert_array_equal(out[1], generate(model, prompts[1], 5))   # (T,) in, (T + new,) out


def test_eos_stops_generation(model):
    greedy = generate(model, PROMPT, 8)
    eos = int(greedy[0, 6])                      # the third generated token
    first = int(np.flatnonzero(greedy[0, 4:] == eos)[0]) + 4
    out = generate(model, PROMPT, 8, eos_id=eos)
    np.testing.assert_array_equal(out, greedy[:, :first])   # stops before appending the eos


def test_next_token_top_k_and_top_p_restrict_choices():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    picks = np.array([next_token(logits, 1.0, top_k=2, rng=rng)[0] for _ in range(300)])
    assert set(picks.tolist()) == {0, 1}
    picks = np.array([next_token(logits, 1.0, top_p=0.7, rng=rng)[0] for _ in range(300)])
    assert set(picks.tolist()) == {0, 1}        # 0.5 < 0.7 needs the second token, then stops
    picks = next_token(np.repeat(logits, 4000, axis=0), 1.0, rng=rng)
    np.testing.assert_allclose(np.bincount(picks, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(max_new_tokens=-1)])
def test_bad_sampling_arguments(model, bad):
    args = dict(max_new_tokens=3) | bad
    with pytest.raises(GPT2Error):
        generate(model, PROMPT, **args)


# ---------------------------------------------------------------------------------------------
# streaming: generate_stream yields generate's tokens one at a time; TextStream decodes them
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(), dict(use_cache=False), dict(temperature=1.3, seed=5), dict(temperature=0.8, top_k=5, seed=2),
    dict(temperature=1.0, top_p=0.7, seed=11), dict(eos_id=7, temperature=1.5, seed=3),
])
def test_stream_yields_the_tokens_of_generate(model, kwargs):
    from gpt2.generate import generate_stream

    for prompt in (PROMPT[0], np.array([[1, 2, 3, 4], [5, 6, 7, 8]])):
        full = generate(model, prompt, 20, **kwargs)      # 20 > context 12: the window slides too
        streamed = list(generate_stream(model, prompt, 20, **kwargs))
        if prompt.ndim == 1:
            assert all(isinstance(t, int) for t in streamed)
            assert full.tolist() == prompt.tolist() + streamed
        else:
            got = np.concatenate([prompt, np.stack(streamed, axis=1)], axis=1) if streamed else prompt
            np.testing.assert_array_equal(full, got)


def test_stream_is_lazy_and_stops_at_eos(model):
    from gpt2.generate import generate_stream

    first = int(generate(model, PROMPT[0], 1)[-1])
    stream = generate_stream(model, PROMPT[0], 10**6)     # nothing computed until asked
    assert next(stream) == first
    assert list(generate_stream(model, PROMPT[0], 5, eos_id=first)) == []


def test_text_stream_never_prints_half_a_character():
    """GPT-2's BPE splits many emoji and CJK characters across tokens: the stream holds their
    first bytes back until the character is whole; the pieces join to decode(ids)."""
    from gpt2_helpers import ByteTokenizer, tokenizer_or_skip

    from gpt2.generate import TextStream

    text = "caf\u00e9 \U0001f600\u4e2d\u6587 ok \U0001f680!"
    for tok in (ByteTokenizer(), tokenizer_or_skip()):
        ids = tok.encode(text)
        stream = TextStream(tok)
        pieces = [stream.add(i) for i in ids] + [stream.end()]
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)
        if tok.n_vocab == 256:   # bytes: the 4 bytes of the emoji give "", "", "", then the character
            k = len("caf\u00e9 ".encode())
            assert pieces[k:k + 4] == ["", "", "", "\U0001f600"]
