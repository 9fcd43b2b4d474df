"""Fused ops: one graph node each, with a backward derived by hand.

Composing these from Tensor primitives works too (see `minigrad.composed`, which the tests check
against), but builds many nodes and keeps every intermediate array alive for backward. A fused op
computes its forward in one go, saves only what its backward needs (often less than the
composed graph would), and applies the derivative in closed form.

Shapes use B = batch, T = time (sequence), C = channels, V = vocabulary, H = heads, D = head size.
"""

from __future__ import annotations

import math

import numpy as np

from . import backend, kernels
from .tensor import Tensor, _lift, is_grad_enabled


def _xp():
    return backend.xp


# ---------------------------------------------------------------------------------------------
# linear: y = x W^T + b
# ---------------------------------------------------------------------------------------------

# Up to this many rows, linear computes (W x^T)^T instead of x W^T. For a few rows (generation,
# where the rows are the tokens of one sequence) OpenBLAS is faster with the wide weight matrix
# as the left operand: 10-25% at GPT-2 124M's shapes and 10-110 rows (2-core Xeon).
SKINNY_ROWS = 128


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., in) @ weight (out, in)^T + bias (out,) -> (..., out).

    Backward, with g = dL/dy of shape (..., out) and the leading axes flattened to N rows:
      dL/dx = g W                  (..., in)
      dL/dW = g^T x                (out, in)   one GEMM over all N rows
      dL/db = sum of g over rows   (out,)
    """
    parents = (x, weight) if bias is None else (x, weight, bias)
    # The leading axes are flattened into rows first: (B, T, in) @ (in, out) as one (B*T, in)
    # GEMM. Left 3-D, NumPy's matmul would call BLAS once per batch element with a (T, in)
    # matrix, about twice as slow for small T.
    x2 = x.data.reshape(-1, x.shape[-1])                           # (N, in)
    if x2.shape[0] <= SKINNY_ROWS:
        y = _xp().ascontiguousarray((weight.data @ x2.T).T)        # (N, out), see SKINNY_ROWS
    else:
        y = x2 @ weight.data.T                                     # (N, out)
    if bias is not None:
        y += bias.data
    out = Tensor._make(y.reshape(x.shape[:-1] + (weight.shape[0],)), parents)
    if out.requires_grad:
        def backward(g):
            g2 = g.reshape(-1, g.shape[-1])                        # (N, out)
            if x.requires_grad:
                x._accumulate((g2 @ weight.data).reshape(x.shape))
            if weight.requires_grad:
                weight._accumulate(g2.T @ x2)
            if bias is not None and bias.requires_grad:
                bias._accumulate(g2.sum(axis=0))
        out._backward = backward
    return out


# ---------------------------------------------------------------------------------------------
# embedding: a table lookup
# ---------------------------------------------------------------------------------------------

def embedding(ids, weight: Tensor) -> Tensor:
    """Rows of `weight` (V, C) picked by integer `ids` (any shape) -> ids.shape + (C,).

    Backward: each looked-up row receives the gradient of every position that used it, so the
    same token appearing twice gets the sum (a scatter-add, not an assignment).
    """
    ids = _int_ids(ids)
    out = Tensor._make(weight.data[ids], (weight,))
    if out.requires_grad:
        def backward(g):
            xp = _xp()
            grad = xp.zeros_like(weight.data)
            flat_ids, flat_g = ids.reshape(-1), g.reshape(-1, weight.shape[1])
            if xp is np:
                # np.add.at is slow for row updates; summing rows that share an id first
                # (unique + a sorted reduceat) gives the same result in a few vector ops.
                order = np.argsort(flat_ids, kind="stable")
                sorted_ids = flat_ids[order]
                starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
                grad[sorted_ids[starts]] = np.add.reduceat(flat_g[order], starts, axis=0)
            else:
                xp.add.at(grad, flat_ids, flat_g)
            weight._accumulate(grad)
        out._backward = backward
    return out


# ---------------------------------------------------------------------------------------------
# GELU (GPT-2's tanh approximation)
# ---------------------------------------------------------------------------------------------

_GELU_C = math.sqrt(2.0 / math.pi)


def gelu(x: Tensor) -> Tensor:
    """GELU(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3).

    Backward (product rule, then chain rule through tanh):
      dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) du/dx,
      du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2).
    Saved: tanh(u) on the CPU (recomputing it would cost a third of the backward pass); x is
    alive anyway. The arithmetic lives in `kernels` (in-place NumPy over cache-sized chunks, or
    one fused CuPy kernel, which recomputes tanh(u) at no cost).
    """
    xd = x.data
    if not (x.requires_grad and is_grad_enabled()):
        return Tensor._make(kernels.gelu_forward(xd), (x,))
    y, saved = kernels.gelu_forward_saving(xd)
    out = Tensor._make(y, (x,))
    out._backward = lambda g: x._accumulate(kernels.gelu_backward(xd, g, saved))
    return out


# ---------------------------------------------------------------------------------------------
# softmax and log-softmax
# ---------------------------------------------------------------------------------------------

def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """y_i = e^{x_i} / sum_j e^{x_j}.

    Backward: dy_i/dx_j = y_i (delta_ij - y_j), so
      dL/dx_j = sum_i g_i y_i (delta_ij - y_j) = y_j (g_j - sum_i g_i y_i).
    """
    y = kernels.softmax(x.data, axis)  # max subtracted first: no overflow
    out = Tensor._make(y, (x,))
    if out.requires_grad:
        out._backward = lambda g: x._accumulate(y * (g - (g * y).sum(axis=axis, keepdims=True)))
    return out


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """y_i = x_i - log sum_j e^{x_j}.

    Backward: dy_i/dx_j = delta_ij - softmax_j, so dL/dx_j = g_j - softmax_j * sum_i g_i.
    """
    xd = x.data
    shifted = xd - xd.max(axis=axis, keepdims=True)
    # (x - m) - log sum e^(x - m), not x - (m + log ...): m + log(...) would round away the
    # small log term when |x| is large in float32 (1e4 + 1.1 has a spacing of ~1e-3)
    y = shifted - _xp().log(_xp().exp(shifted).sum(axis=axis, keepdims=True))
    out = Tensor._make(y, (x,))
    if out.requires_grad:
        out._backward = lambda g: x._accumulate(g - _xp().exp(y) * g.sum(axis=axis, keepdims=True))
    return out


# ---------------------------------------------------------------------------------------------
# layer norm
# ---------------------------------------------------------------------------------------------

def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """Normalise over the last axis, then scale and shift: y = xhat * w + b,
    xhat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps)  (biased variance, as GPT-2).

    Backward (as llm.c's layernorm_backward). With dxhat = g * w and means over the C channels:
      dL/dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    The two subtracted terms come from mean and rstd depending on every x_j: the first removes
    the part of dxhat that only shifts all inputs, the second the part that only scales them.
      dL/dw = sum over rows of g * xhat,   dL/db = sum over rows of g.
    Saved: mean and rstd per row (x itself is alive anyway); xhat is recomputed.
    The arithmetic lives in `kernels` (in-place NumPy, or fused CuPy kernels).
    """
    w = weight.data if weight is not None else None
    y, mean, rstd = kernels.layer_norm_forward(x.data, w, bias.data if bias is not None else None, eps)
    parents = tuple(t for t in (x, weight, bias) if t is not None)
    out = Tensor._make(y, parents)
    if out.requires_grad:
        def backward(g):
            dx, dw, db = kernels.layer_norm_backward(x.data, mean, rstd, w, g, need_dx=x.requires_grad)
            if weight is not None and weight.requires_grad:
                weight._accumulate(dw)
            if bias is not None and bias.requires_grad:
                bias._accumulate(db)
            if dx is not None:
                x._accumulate(dx)
        out._backward = backward
    return out


# ---------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------

def dropout(x: Tensor, p: float = 0.1, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p) ("inverted" dropout),
    so the expected value is unchanged and evaluation needs no rescaling: in eval mode, or with
    p = 0, it is the identity. The mask comes from minigrad's seeded generator.

    Backward: the same mask and scale applied to the gradient. The mask is saved as booleans.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    keep = backend.rng().random(x.shape) >= p
    scale = 1.0 / (1.0 - p)
    out = Tensor._make(x.data * keep * x.data.dtype.type(scale), (x,))
    if out.requires_grad:
        out._backward = lambda g: x._accumulate(g * keep * g.dtype.type(scale))
    return out


# ---------------------------------------------------------------------------------------------
# cross-entropy
# ---------------------------------------------------------------------------------------------

def cross_entropy(logits: Tensor, targets, ignore_index: int = -100) -> Tensor:
    """Mean over targets of -log softmax(logits)[target]; logits (..., V), targets (...) ints.

    Targets equal to `ignore_index` contribute nothing and are not counted in the mean.
    Numerically stable: log sum exp is computed after subtracting each row's max, so logits of
    1e4 give a finite loss.

    Backward: for one row, d(-log p_t)/dz_j = p_j - [j == t] (softmax minus one-hot), divided by
    the number of counted targets; ignored rows get zero. The probabilities are saved from the
    forward pass and turned into the gradient in place (backward runs once per graph).
    """
    xp = _xp()
    V = logits.shape[-1]
    z = logits.data.reshape(-1, V)
    t = _int_ids(targets).reshape(-1)
    if t.shape[0] != z.shape[0]:
        raise ValueError(f"cross_entropy: {z.shape[0]} rows of logits but {t.shape[0]} targets")
    valid = t != ignore_index
    t_safe = xp.where(valid, t, 0)
    n_valid = valid.sum()
    # log sum e^z - z_t, computed relative to the row max (as in log_softmax, for accuracy); the
    # (N, V) probabilities come back in one buffer, which backward turns into the gradient
    losses, probs = kernels.softmax_cross_entropy(z, t_safe, valid)
    loss = losses.sum() / n_valid
    out = Tensor._make(loss.astype(z.dtype), (logits,))
    if out.requires_grad:
        def backward(g):
            row_scale = (valid * (g / n_valid)).astype(probs.dtype)  # 0 for ignored rows
            grad = kernels.cross_entropy_grad_(probs, t_safe, row_scale)
            logits._accumulate(grad.reshape(logits.shape))
        out._backward = backward
    return out


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

def causal_mask(Tq: int, Tk: int):
    """Boolean (Tq, Tk) mask, True where query i may NOT look at key j.

    Query i sits at absolute position (Tk - Tq) + i (with a KV cache, the queries are the last
    Tq of Tk positions), and may attend to keys at positions <= its own.
    """
    xp = _xp()
    return xp.arange(Tk)[None, :] > (xp.arange(Tq)[:, None] + (Tk - Tq))


_BIAS_CACHE: dict = {}
_BIAS_CACHE_MAX = 1 << 22  # elements: a larger bias is built broadcastable instead of whole


def _causal_bias_keys_first(Tq: int, Tk: int, n: int, dtype):
    """0 / -inf of shape (Tk, n, Tq) for scores stored keys first, (Tk, n sequences x heads, Tq):
    -inf where query i may not see key j. Adding it is one contiguous pass; broadcasting a
    (Tk, 1, Tq) mask instead would run n * Tk short loops. Kept for the last shape asked
    (every layer of a forward pass asks for the same one)."""
    xp = _xp()
    key = (Tq, Tk, n, np.dtype(dtype).str, backend.get_backend())
    if key not in _BIAS_CACHE:
        bias = xp.where(causal_mask(Tq, Tk).T[:, None, :], -xp.inf, 0.0).astype(dtype)  # (Tk, 1, Tq)
        if Tk * n * Tq <= _BIAS_CACHE_MAX:
            bias = xp.ascontiguousarray(xp.broadcast_to(bias, (Tk, n, Tq)))
        _BIAS_CACHE.clear()
        _BIAS_CACHE[key] = bias
    return _BIAS_CACHE[key]


def _scores_keys_first(rows: int, Tk: int) -> bool:
    """Store attention scores keys first when there are many rows (queries x batch x heads) for
    their length Tk; see `scaled_dot_product_attention`. Not with compiled row loops
    (`kernels.row_loops_compiled`), which pay nothing per row: the copies into that layout
    would then be pure cost."""
    return rows >= 2 * Tk and not kernels.row_loops_compiled()


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                                 dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(D) + mask) v, for q (..., Tq, D) and k, v (..., Tk, D); usually
    (B, H, T, D), with the batch and head axes in front.

    Forward:  S = q k^T * s (s = 1/sqrt(D)),  P = softmax(S) (masked entries -> 0),
              Pd = dropout(P),  O = Pd v.
    Backward, with G = dL/dO:
      dv = Pd^T G                                   (..., Tk, D)
      dPd = G v^T,  dP = dPd * keep / (1 - p)       (dropout's backward)
      dS = P * (dP - rowsum(dP * P))                (softmax's backward, as in `softmax`)
      dq = dS k * s,  dk = dS^T q * s
    Masked positions have P = 0, so they get dS = 0 with no special case.
    Saved: P (and the dropout mask); q, k, v are alive anyway.

    How the scores are laid out in memory. Softmax and its backward reduce every query's row of
    Tk scores. Stored as (..., Tq, Tk), that is one short reduction per row, and NumPy pays a
    fixed cost per row (about as much as the arithmetic when Tk = 64). So when there are many
    rows, the scores are stored *keys first*, (Tk, ..., Tq): S[..., i, j] lives at [j, ..., i],
    a query's scores run down axis 0, and each reduction is Tk whole-array vector operations
    over long contiguous rows. k q^T is computed as usual and copied into that layout in the
    pass that scales it; the matmuls after it read the buffer through transposed views (BLAS
    takes transposed operands as they are), and the elementwise passes run on the buffer
    itself. With few rows (generation with a KV cache: one query per sequence) the scores are
    stored (..., Tq, Tk). At nanoGPT's Shakespeare size, (12, 4, 64, 64) scores, forward and
    backward went from 1.9 to 1.6 ms (2-core Xeon).

    The output is stored with the query axis before the last batch axis, (B, Tq, H, D) for
    (B, H, Tq, D): putting the heads side by side again, (B, Tq, H * D), is then free.
    """
    xp = _xp()
    *batch, Tq, D = q.shape
    Tk = k.shape[-2]
    scale = q.dtype.type(1.0 / math.sqrt(D))
    keys_first = _scores_keys_first(math.prod(batch) * Tq, Tk)
    if keys_first:
        ST = k.data @ xp.swapaxes(q.data, -1, -2)                # (..., Tk, Tq), contiguous
        buf = xp.empty((Tk, *batch, Tq), dtype=q.dtype)          # buf[j, ..., i] = S[..., i, j]
        xp.multiply(xp.moveaxis(ST, -2, 0), scale, out=buf)     # scaled, copied keys first
        S, axis = xp.moveaxis(buf, 0, -1), 0
        if causal:
            # -inf added where masked: one pass over the buffer with a same-shape operand
            flat = buf.reshape(Tk, -1, Tq)
            flat += _causal_bias_keys_first(Tq, Tk, flat.shape[1], q.dtype)
    else:
        buf = q.data @ xp.swapaxes(k.data, -1, -2)               # (..., Tq, Tk)
        S, axis = buf, -1
    if keys_first:
        kernels.softmax(buf, axis, out=buf)                   # the scores' buffer now holds P
    else:
        # scaled, masked (one query, the newest, sees every key: nothing to mask) and softmaxed,
        # in place: buf holds P
        kernels.scaled_masked_softmax_(buf, scale, causal_mask(Tq, Tk) if causal and Tq > 1 else None)
    P = S                                                     # (..., Tq, Tk) view of it
    if dropout_p > 0.0:
        if not 0.0 < dropout_p < 1.0:
            raise ValueError(f"attention dropout must be in [0, 1), got {dropout_p}")
        keep = backend.rng().random(S.shape) >= dropout_p     # drawn in (..., Tq, Tk) order
        drop_scale = q.dtype.type(1.0 / (1.0 - dropout_p))
        Pd = xp.multiply(P, keep)
        Pd *= drop_scale
    else:
        keep, Pd = None, P
    o = xp.empty((*batch[:-1], Tq, batch[-1], D) if batch else (Tq, D), dtype=q.dtype)
    o = xp.moveaxis(o, -3, -2) if batch else o                # (..., Tq, D) view
    xp.matmul(Pd, v.data, out=o)
    out = Tensor._make(o, (q, k, v))
    if out.requires_grad:
        def backward(G):
            if v.requires_grad:
                v._accumulate(xp.swapaxes(Pd, -1, -2) @ G)
            if keys_first:
                dPT = v.data @ xp.swapaxes(G, -1, -2)            # dPd^T = v G^T, (..., Tk, Tq)
                dbuf = xp.empty_like(buf)
                xp.copyto(dbuf, xp.moveaxis(dPT, -2, 0))         # keys first, like buf
                dS = xp.moveaxis(dbuf, 0, -1)
            else:
                dbuf = dS = G @ xp.swapaxes(v.data, -1, -2)     # dPd = G v^T
            if keep is not None:
                dS *= keep
                dS *= drop_scale
            kernels.softmax_backward_(dbuf, buf, axis, scale)    # dS = P (dP - rowsum(dP P)) s
            if q.requires_grad:
                q._accumulate(dS @ k.data)
            if k.requires_grad:
                k._accumulate(xp.swapaxes(dS, -1, -2) @ q.data)
        out._backward = backward
    return out


# ---------------------------------------------------------------------------------------------
# simple wrappers, so a model can be written with F.* only
# ---------------------------------------------------------------------------------------------

def relu(x: Tensor) -> Tensor:
    return x.relu()


def tanh(x: Tensor) -> Tensor:
    return x.tanh()


def mse_loss(pred: Tensor, target) -> Tensor:
    d = pred - _lift(target, pred)
    return (d * d).mean()


def _int_ids(ids):
    """Integer indices as a backend array (accepts Tensors, NumPy/CuPy arrays and lists)."""
    if isinstance(ids, Tensor):
        ids = ids.data
    arr = backend.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"expected integer token ids, got dtype {arr.dtype}")
    return arr
