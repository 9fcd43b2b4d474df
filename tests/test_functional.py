"""Fused functional ops: gradchecks, NumPy references, and agreement with their composed twins.

`minigrad.functional` derives each backward by hand; `minigrad.composed` writes the same op from
Tensor primitives, so autograd derives it. Equal values *and* gradients mean the hand derivation
is right (and gradcheck confirms both against finite differences).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import minigrad as mg
from minigrad import F, Tensor, composed, gradcheck, kernels

RNG = np.random.default_rng(4321)


def t(*shape, scale=1.0):
    return Tensor(RNG.standard_normal(shape) * scale, requires_grad=True, dtype=np.float64)


def twins(*tensors):
    """Independent float64 copies of some leaves (for running the fused and composed op side by side)."""
    return [Tensor(x.numpy().copy(), requires_grad=x.requires_grad, dtype=np.float64) for x in tensors]


def close(a, b, rtol=1e-10, atol=1e-12):
    a = a.numpy() if isinstance(a, Tensor) else mg.to_numpy(a)
    b = b.numpy() if isinstance(b, Tensor) else mg.to_numpy(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def assert_same_as_composed(fused_fn, composed_fn, *inputs, rtol=1e-10, atol=1e-12):
    """Values and the gradients of every input agree between the two implementations."""
    a_in, b_in = twins(*inputs), twins(*inputs)
    out_a, out_b = fused_fn(*a_in), composed_fn(*b_in)
    assert out_a.shape == out_b.shape
    close(out_a, out_b, rtol, atol)
    g = mg.backend.asarray(RNG.standard_normal(out_a.shape))
    out_a.backward(g)
    out_b.backward(g)
    for x, y in zip(a_in, b_in):
        if x.requires_grad:
            assert x.grad is not None and y.grad is not None
            close(x.grad, y.grad, rtol, atol)


# ---------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_shape", [(3, 4), (2, 3, 4), (4,)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(backend, x_shape, bias):
    x, w = t(*x_shape), t(5, 4)
    b = t(5) if bias else None
    inputs = (x, w, b) if bias else (x, w)
    out = F.linear(*inputs)
    expected = x.numpy() @ w.numpy().T + (b.numpy() if bias else 0.0)
    assert out.shape == x_shape[:-1] + (5,)
    close(out, expected)
    assert gradcheck(F.linear, *inputs)
    assert_same_as_composed(F.linear, composed.linear, *inputs)


# ---------------------------------------------------------------------------------------------
# embedding
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ids", [[3, 1, 3, 3, 0], [[1, 1, 4], [4, 0, 1]]])
def test_embedding(backend, ids):
    w = t(6, 3)
    out = F.embedding(ids, w)
    close(out, w.numpy()[np.array(ids)])
    assert gradcheck(lambda w: F.embedding(ids, w), w)
    assert_same_as_composed(lambda w: F.embedding(ids, w), lambda w: composed.embedding(ids, w), w)


def test_embedding_repeated_ids_sum_their_gradients(backend):
    w = Tensor(np.zeros((4, 2)), requires_grad=True, dtype=np.float64)
    ids = mg.backend.asarray(np.array([[2, 0, 2], [2, 3, 0]]))
    F.embedding(ids, w).sum().backward()
    close(w.grad, [[2.0, 2.0], [0.0, 0.0], [3.0, 3.0], [1.0, 1.0]])


def test_embedding_accepts_tensor_ids_and_rejects_floats(backend):
    w = t(5, 2)
    close(F.embedding(Tensor(np.array([4, 4])), w), w.numpy()[[4, 4]])
    with pytest.raises(TypeError, match="integer"):
        F.embedding(np.array([1.0, 2.0]), w)


# ---------------------------------------------------------------------------------------------
# GELU
# ---------------------------------------------------------------------------------------------

def test_gelu(backend):
    x = t(3, 7, scale=2.0)
    xn = x.numpy()
    expected = 0.5 * xn * (1 + np.tanh(math.sqrt(2 / math.pi) * (xn + 0.044715 * xn ** 3)))
    close(F.gelu(x), expected)
    close(F.gelu(Tensor([0.0, 100.0, -100.0], dtype=np.float64)), [0.0, 100.0, 0.0])
    assert gradcheck(F.gelu, x)
    assert_same_as_composed(F.gelu, composed.gelu, x)


# ---------------------------------------------------------------------------------------------
# softmax and log_softmax
# ---------------------------------------------------------------------------------------------

def np_softmax(z, axis):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_softmax(backend, axis):
    x = t(2, 3, 4)
    out = F.softmax(x, axis=axis)
    close(out, np_softmax(x.numpy(), axis))
    close(out.numpy().sum(axis=axis), np.ones(np.delete(np.array((2, 3, 4)), axis % 3)))
    assert gradcheck(lambda x: F.softmax(x, axis=axis), x)
    assert_same_as_composed(lambda x: F.softmax(x, axis=axis), lambda x: composed.softmax(x, axis=axis), x)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_log_softmax(backend, axis):
    x = t(2, 3, 4)
    out = F.log_softmax(x, axis=axis)
    close(out, np.log(np_softmax(x.numpy(), axis)))
    assert gradcheck(lambda x: F.log_softmax(x, axis=axis), x)
    assert_same_as_composed(lambda x: F.log_softmax(x, axis=axis),
                            lambda x: composed.log_softmax(x, axis=axis), x)


def test_softmax_is_stable_for_huge_logits(backend):
    x = Tensor([[1e4, 0.0, -1e4], [1e4, 1e4, 1e4]])  # float32: exp(1e4) alone would overflow
    close(F.softmax(x), [[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]], rtol=1e-6)
    close(F.log_softmax(x), [[0.0, -1e4, -2e4], [-math.log(3)] * 3], rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# layer norm
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_weight, use_bias", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("x_shape", [(3, 5), (2, 3, 5)])
def test_layer_norm(backend, x_shape, use_weight, use_bias):
    x = t(*x_shape, scale=3.0)
    w = t(5) if use_weight else None
    b = t(5) if use_bias else None
    leaves = [v for v in (x, w, b) if v is not None]

    def split(*args):  # rebuild (x, weight, bias) from only the tensors that exist
        it = iter(args)
        return next(it), (next(it) if use_weight else None), (next(it) if use_bias else None)

    fused = lambda *args: F.layer_norm(*split(*args))
    comp = lambda *args: composed.layer_norm(*split(*args))
    xn = x.numpy()
    expected = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)
    expected = expected * (w.numpy() if use_weight else 1.0) + (b.numpy() if use_bias else 0.0)
    close(fused(*leaves), expected)
    assert gradcheck(fused, *leaves)
    assert_same_as_composed(fused, comp, *leaves)


def test_layer_norm_without_affine_is_standardised(backend):
    x = Tensor(RNG.standard_normal((4, 64)) * 5 + 3, dtype=np.float32)
    y = F.layer_norm(x).numpy()
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(-1), 1.0, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------

def test_dropout_gradcheck_with_fixed_seed(backend):
    x = t(4, 5)

    def fn(x):
        mg.manual_seed(7)  # the same mask on every call, so finite differences see one function
        return F.dropout(x, p=0.4, training=True)

    out = fn(x).numpy()
    assert (out == 0).any() and (out != 0).any()
    assert gradcheck(fn, x)


def test_dropout_uses_the_same_mask_forward_and_backward(backend):
    x = Tensor(RNG.standard_normal((50, 40)) + 10.0, requires_grad=True, dtype=np.float64)  # no zeros
    p = 0.25
    y = F.dropout(x, p=p)
    y.backward(np.ones(y.shape))
    kept = y.numpy() != 0
    close(y, np.where(kept, x.numpy() / (1 - p), 0.0))
    close(x.grad, kept / (1 - p))


def test_dropout_identity_in_eval_and_with_p_zero(backend):
    x = t(3, 4)
    assert F.dropout(x, p=0.5, training=False) is x
    assert F.dropout(x, p=0.0, training=True) is x
    with pytest.raises(ValueError):
        F.dropout(x, p=1.0)
    with pytest.raises(ValueError):
        F.dropout(x, p=-0.1)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_statistics(backend, p):
    x = Tensor(np.ones((1000, 1000)))
    y = F.dropout(x, p=p).numpy()
    kept = (y != 0).mean()
    assert abs(kept - (1 - p)) < 0.005  # 1e6 Bernoulli draws: std of the fraction < 0.0005
    assert abs(y.mean() - 1.0) < 0.01  # inverted dropout preserves the mean
    np.testing.assert_allclose(y[y != 0], 1.0 / (1 - p), rtol=1e-6)


def test_dropout_seeded_masks(backend):
    x = Tensor(np.ones((20, 30)))
    mg.manual_seed(3)
    a = F.dropout(x, p=0.5).numpy()
    b = F.dropout(x, p=0.5).numpy()
    mg.manual_seed(3)
    c = F.dropout(x, p=0.5).numpy()
    np.testing.assert_array_equal(a, c)  # same seed, same mask
    assert (a != b).any()  # the next draw is a different mask


# ---------------------------------------------------------------------------------------------
# cross-entropy
# ---------------------------------------------------------------------------------------------

def np_cross_entropy(logits, targets, ignore_index=-100):
    """Float64 reference: mean over counted rows of logsumexp(z) - z[target]."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1, logits.shape[-1])
    tg = np.asarray(targets).reshape(-1)
    m = z.max(axis=1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    valid = tg != ignore_index
    return float((lse - z[np.arange(len(tg)), np.where(valid, tg, 0)])[valid].mean())


@pytest.mark.parametrize("shape, targets", [
    ((4, 5), [0, 4, 2, 2]),
    ((2, 3, 5), [[1, 0, 4], [3, 3, 2]]),
    ((4, 5), [1, -100, 3, -100]),
    ((2, 3, 5), [[-100, 0, 4], [3, -100, -100]]),
])
def test_cross_entropy(backend, shape, targets):
    logits = t(*shape, scale=2.0)
    loss = F.cross_entropy(logits, targets)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(np_cross_entropy(logits.numpy(), np.array(targets)), rel=1e-12)
    assert gradcheck(lambda z: F.cross_entropy(z, targets), logits)
    assert_same_as_composed(lambda z: F.cross_entropy(z, targets),
                            lambda z: composed.cross_entropy(z, targets), logits)


def test_cross_entropy_ignored_rows_get_no_gradient(backend):
    logits = t(4, 3)
    targets = mg.backend.asarray(np.array([2, -100, 0, -100]))
    F.cross_entropy(logits, targets).backward()
    g = mg.to_numpy(logits.grad)
    np.testing.assert_array_equal(g[[1, 3]], 0.0)
    # counted rows: (softmax - onehot) / 2 counted targets
    p = np_softmax(logits.numpy(), -1)
    expected = (p - np.eye(3)[[2, 0, 0, 0]]) / 2
    np.testing.assert_allclose(g[[0, 2]], expected[[0, 2]], rtol=1e-10)


def test_cross_entropy_other_ignore_index(backend):
    logits = t(3, 4)
    loss = F.cross_entropy(logits, [1, 3, 2], ignore_index=3)
    assert loss.item() == pytest.approx(np_cross_entropy(logits.numpy(), np.array([1, 3, 2]), 3), rel=1e-12)


@pytest.mark.parametrize("dtype, rel", [(np.float64, 1e-12), (np.float32, 1e-6)])
def test_cross_entropy_huge_logits_are_finite_and_exact(backend, dtype, rel):
    z = RNG.standard_normal((6, 10)) * 1e4
    targets = np.array([0, 3, 9, 9, 5, 1])
    logits = Tensor(z, requires_grad=True, dtype=dtype)
    loss = F.cross_entropy(logits, targets)
    reference = np_cross_entropy(z.astype(dtype), targets)  # float64 math on the same inputs
    assert np.isfinite(loss.item())
    assert reference > 1e3  # a genuinely large loss
    assert loss.item() == pytest.approx(reference, rel=rel)
    loss.backward()
    g = mg.to_numpy(logits.grad)
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g.sum(axis=1), 0.0, atol=1e-6)  # softmax - onehot sums to 0 per row


def test_cross_entropy_keeps_small_losses_accurate_next_to_huge_logits(backend):
    # Target = the max logit: the loss is log(1 + e^-1 + ...) ~ 0.313, a small number next to logits
    # of 1e4. Computing it as (m + log sum) - z_t in float32 would round it to a multiple of ~1e-3.
    z = np.array([[1e4, 1e4 - 1.0, -1e4], [-1e4, 2.0, 1e4]])
    targets = np.array([0, 2])
    loss = F.cross_entropy(Tensor(z, dtype=np.float32), targets)
    assert loss.item() == pytest.approx(np_cross_entropy(z, targets), rel=1e-6)
    logp = F.log_softmax(Tensor(z, dtype=np.float32)).numpy()
    shifted = z - z.max(axis=1, keepdims=True)
    np.testing.assert_allclose(logp, shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)), rtol=1e-6)


def test_cross_entropy_checks_its_inputs(backend):
    logits = t(4, 3)
    with pytest.raises(ValueError, match="targets"):
        F.cross_entropy(logits, [0, 1, 2])
    with pytest.raises(TypeError, match="integer"):
        F.cross_entropy(logits, np.array([0.0, 1.0, 2.0, 0.0]))


def test_cross_entropy_of_uniform_logits_is_log_v(backend):
    loss = F.cross_entropy(Tensor(np.zeros((8, 50))), list(range(8)))
    assert loss.item() == pytest.approx(math.log(50), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

def test_causal_mask(backend):
    np.testing.assert_array_equal(mg.to_numpy(F.causal_mask(3, 3)), np.triu(np.ones((3, 3), bool), k=1))
    # with a KV cache the 2 queries are the last 2 of 4 positions
    np.testing.assert_array_equal(mg.to_numpy(F.causal_mask(2, 4)),
                                  [[False, False, False, True], [False, False, False, False]])


def np_attention(q, k, v, causal):
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    if causal:
        Tq, Tk = s.shape[-2:]
        s = np.where(np.arange(Tk)[None, :] > np.arange(Tq)[:, None] + (Tk - Tq), -np.inf, s)
    return np_softmax(s, -1) @ v


ATTN_SHAPES = [(3, 3), (2, 4), (1, 4)]  # (Tq, Tk): Tq < Tk is decoding with a KV cache


@pytest.mark.parametrize("Tq, Tk", ATTN_SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_attention(backend, Tq, Tk, causal):
    B, H, D = 1, 2, 3
    q, k, v = t(B, H, Tq, D), t(B, H, Tk, D), t(B, H, Tk, D)
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal)
    out = fn(q, k, v)
    assert out.shape == (B, H, Tq, D)
    close(out, np_attention(q.numpy(), k.numpy(), v.numpy(), causal))
    assert gradcheck(fn, q, k, v)
    assert_same_as_composed(fn, lambda q, k, v: composed.scaled_dot_product_attention(q, k, v, causal=causal),
                            q, k, v)


@pytest.mark.parametrize("keys_first", [True, False])
@pytest.mark.parametrize("q_shape, Tk", [((4, 3), 4), ((2, 3, 3), 3), ((2, 2, 4, 3), 4), ((1, 3, 2, 3), 5)])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_both_score_layouts(backend, monkeypatch, keys_first, q_shape, Tk, causal):
    """Scores stored keys first or queries first (chosen by shape; forced here) give the same
    attention: values, gradients (composed twin and finite differences), any number of batch
    axes, and a KV cache's Tq < Tk."""
    monkeypatch.setattr(kernels, "scores_keys_first", lambda rows, Tk: keys_first)
    kv_shape = (*q_shape[:-2], Tk, q_shape[-1])
    q, k, v = t(*q_shape), t(*kv_shape), t(*kv_shape)
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal)
    close(fn(q, k, v), np_attention(q.numpy(), k.numpy(), v.numpy(), causal))
    assert_same_as_composed(fn, lambda q, k, v: composed.scaled_dot_product_attention(q, k, v, causal=causal),
                            q, k, v)
    assert gradcheck(fn, q, k, v)


def test_attention_layouts_draw_the_same_dropout_mask(backend, monkeypatch):
    """The mask is drawn in (..., Tq, Tk) order whatever the layout: a seeded run is the same."""
    q, k, v = t(2, 2, 4, 3), t(2, 2, 4, 3), t(2, 2, 4, 3)
    outs, grads = [], []
    for keys_first in (True, False):
        monkeypatch.setattr(kernels, "scores_keys_first", lambda rows, Tk, kf=keys_first: kf)
        a = twins(q, k, v)
        mg.manual_seed(5)
        out = F.scaled_dot_product_attention(*a, causal=True, dropout_p=0.4)
        out.sum().backward()
        outs.append(out.numpy())
        grads.append([mg.to_numpy(x.grad) for x in a])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-12, atol=1e-14)
    for g0, g1 in zip(*grads):
        np.testing.assert_allclose(g0, g1, rtol=1e-12, atol=1e-14)


def test_attention_output_puts_heads_side_by_side_for_free():
    """The output (B, H, T, D) is stored as (B, T, H, D): merging the heads is a view, not a copy."""
    q = t(2, 3, 5, 4)
    out = F.scaled_dot_product_attention(q, q, q)
    merged = out.data.transpose(0, 2, 1, 3)
    assert merged.flags.c_contiguous
    assert np.shares_memory(merged.reshape(2, 5, 12), out.data)


def test_attention_picks_keys_first_for_many_short_rows():
    with mg.backend.cpu_kernels("numpy"):  # (compiled row loops keep (..., Tq, Tk): test_cpu_kernels)
        assert kernels.scores_keys_first(rows=12 * 4 * 64, Tk=64)        # training: (B, H, T, T) scores
        assert not kernels.scores_keys_first(rows=1 * 12 * 1, Tk=100)    # generation with a KV cache


def test_attention_with_dropout_gradcheck(backend):
    q, k, v = t(1, 2, 3, 2), t(1, 2, 3, 2), t(1, 2, 3, 2)

    def fn(q, k, v):
        mg.manual_seed(11)  # the same dropout mask on every call
        return F.scaled_dot_product_attention(q, k, v, causal=True, dropout_p=0.3)

    no_drop = F.scaled_dot_product_attention(q, k, v, causal=True).numpy()
    assert not np.allclose(fn(q, k, v).numpy(), no_drop)  # dropout did something
    np.testing.assert_array_equal(fn(q, k, v).numpy(), fn(q, k, v).numpy())
    assert gradcheck(fn, q, k, v)
    with pytest.raises(ValueError):
        F.scaled_dot_product_attention(q, k, v, dropout_p=1.0)


@pytest.mark.parametrize("Tq, Tk", [(5, 5), (3, 5)])
def test_attention_is_causal(backend, Tq, Tk):
    """Changing the key and value at position j changes only outputs of queries at positions >= j."""
    q, k, v = t(2, 2, Tq, 4), t(2, 2, Tk, 4), t(2, 2, Tk, 4)
    base = F.scaled_dot_product_attention(q, k, v).numpy()
    for j in range(Tk):
        k2, v2 = k.numpy().copy(), v.numpy().copy()
        k2[:, :, j] += 5.0
        v2[:, :, j] -= 3.0
        out = F.scaled_dot_product_attention(q, Tensor(k2), Tensor(v2)).numpy()  # float64 arrays stay float64
        for i in range(Tq):
            pos = Tk - Tq + i  # the query's absolute position
            if pos < j:
                np.testing.assert_array_equal(out[:, :, i], base[:, :, i])
            else:
                assert np.abs(out[:, :, i] - base[:, :, i]).max() > 1e-6
    # and the gradient of an early output never reaches a later key or value
    q.grad = k.grad = v.grad = None
    F.scaled_dot_product_attention(q, k, v)[:, :, 0].sum().backward()
    first_pos = Tk - Tq
    np.testing.assert_array_equal(mg.to_numpy(k.grad)[:, :, first_pos + 1:], 0.0)
    np.testing.assert_array_equal(mg.to_numpy(v.grad)[:, :, first_pos + 1:], 0.0)


# ---------------------------------------------------------------------------------------------
# small wrappers
# ---------------------------------------------------------------------------------------------

def test_wrappers(backend):
    x = t(3, 4)
    close(F.relu(x), np.maximum(x.numpy(), 0))
    close(F.tanh(x), np.tanh(x.numpy()))
    target = RNG.standard_normal((3, 4))
    assert F.mse_loss(x, target).item() == pytest.approx(((x.numpy() - target) ** 2).mean(), rel=1e-12)
    assert gradcheck(lambda x: F.mse_loss(x, target), x)


def test_fused_ops_keep_float32(backend):
    x = Tensor(RNG.standard_normal((2, 3, 4)), requires_grad=True, dtype=np.float32)
    w = Tensor(RNG.standard_normal((5, 4)), requires_grad=True, dtype=np.float32)
    outs = [F.linear(x, w), F.gelu(x), F.softmax(x), F.log_softmax(x), F.layer_norm(x),
            F.dropout(x, 0.5), F.scaled_dot_product_attention(x, x, x),
            F.cross_entropy(x, np.zeros((2, 3), dtype=np.int64))]
    for out in outs:
        assert out.dtype == np.float32
        out.sum().backward()
    assert x.grad.dtype == np.float32 and w.grad.dtype == np.float32
