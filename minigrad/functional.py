"""Fused ops: one graph node each, with a backward derived by hand.

Composing these from Tensor primitives works too (see `minigrad.composed`, which the tests check
against), but builds many nodes and keeps every intermediate array alive for backward. A fused op
computes its forward in one go, saves only what its backward needs (often less than the
composed graph would), and applies the derivative in closed form.

Each op here is its definition: the formula, the derivation of its backward, and the plainest
array code. Where the fast way to compute a step is not the plain one (in-place and chunked
NumPy, a memory layout, a fused GPU kernel), the step is a call into `kernels` by name, and the
trick is explained there.

Shapes use B = batch, T = time (sequence), C = channels, V = vocabulary, H = heads, D = head size.
"""

from __future__ import annotations

import math

from . import backend, kernels
from .tensor import Tensor, is_grad_enabled

# ---------------------------------------------------------------------------------------------
# linear: y = x W^T + b
# ---------------------------------------------------------------------------------------------

def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., in) @ weight (out, in)^T + bias (out,) -> (..., out).

    Backward, with g = dL/dy of shape (..., out) and the leading axes flattened to N rows.
    y_nj = sum_i x_ni W_ji + b_j, so dy_nj/dx_ni = W_ji, dy_nj/dW_ji = x_ni, dy_nj/db_j = 1:
      dL/dx = g W                  (..., in)
      dL/dW = g^T x                (out, in)   one GEMM over all N rows
      dL/db = sum of g over rows   (out,)
    """
    parents = (x, weight) if bias is None else (x, weight, bias)
    # The leading axes flattened into N rows: one (N, in) GEMM for the whole batch (left 3-D,
    # NumPy's matmul would call BLAS once per batch element, with a short (T, in) matrix).
    x2 = x.data.reshape(-1, x.shape[-1])                           # (N, in)
    y = kernels.matmul_transposed(x2, weight.data)                 # x W^T, (N, out)
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
    same token appearing twice gets the sum (a scatter-add, not an assignment):
      dL/dW[v] = sum over positions p with ids[p] = v of g[p]   (np.add.at(dW, ids, g))
    """
    ids = int_ids(ids)
    out = Tensor._make(weight.data[ids], (weight,))
    if out.requires_grad:
        def backward(g):
            V, C = weight.shape
            weight._accumulate(kernels.sum_rows_by_id(ids.reshape(-1), g.reshape(-1, C), V))
        out._backward = backward
    return out


# ---------------------------------------------------------------------------------------------
# GELU (GPT-2's tanh approximation)
# ---------------------------------------------------------------------------------------------

def gelu(x: Tensor) -> Tensor:
    """GELU(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3).

    Backward (product rule, then chain rule through tanh):
      dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) du/dx,
      du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2).
    Saved: tanh(u) on the CPU (the costliest part of the backward, so not recomputed); x is
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
    xp = backend.xp
    y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
    out = Tensor._make(y, (x,))
    if out.requires_grad:
        out._backward = lambda g: x._accumulate(g - backend.xp.exp(y) * g.sum(axis=axis, keepdims=True))
    return out


# ---------------------------------------------------------------------------------------------
# layer norm
# ---------------------------------------------------------------------------------------------

def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """Normalise over the last axis, then scale and shift: y = xhat * w + b,
    xhat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps)  (biased variance, as GPT-2).

    Backward (as llm.c's layernorm_backward), per row of C channels, with dxhat = g * w. Since
    d mean/dx_j = 1/C and d rstd/dx_j = -rstd^3 (x_j - mean) / C = -rstd^2 xhat_j / C,
      dxhat_i/dx_j = rstd (delta_ij - 1/C) - xhat_i rstd xhat_j / C,  so summing over i:
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
    xp = backend.xp
    V = logits.shape[-1]
    z = logits.data.reshape(-1, V)
    t = int_ids(targets).reshape(-1)
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
    xp = backend.xp
    return xp.arange(Tk)[None, :] > (xp.arange(Tq)[:, None] + (Tk - Tq))


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

    The (..., Tq, Tk) matrices S, P and dP are `kernels.AttentionScores`, stored keys first when
    there are many rows (NumPy's softmax is then whole-array passes instead of one short
    reduction per row); the output is stored so that putting the heads side by side again is
    free (`kernels.attention_output`).
    """
    if dropout_p >= 1.0:
        raise ValueError(f"attention dropout must be in [0, 1), got {dropout_p}")
    xp = backend.xp
    scale = q.dtype.type(1.0 / math.sqrt(q.shape[-1]))
    scores = kernels.AttentionScores(q.data, k.data, scale)     # S = q k^T s   (..., Tq, Tk)
    # In place: S = -inf where key j is after query i, then the scores become P = softmax(S).
    P = scores.softmax_(causal_mask if causal else None)
    if dropout_p > 0.0:
        keep = backend.rng().random(P.shape) >= dropout_p         # drawn in (..., Tq, Tk) order
        drop_scale = q.dtype.type(1.0 / (1.0 - dropout_p))
        Pd = xp.multiply(P, keep)
        Pd *= drop_scale
    else:
        keep, Pd = None, P
    out = Tensor._make(kernels.attention_output(Pd, v.data), (q, k, v))   # O = Pd v
    if out.requires_grad:
        def backward(G):
            if v.requires_grad:
                v._accumulate(xp.swapaxes(Pd, -1, -2) @ G)
            dP = kernels.AttentionScores(G, v.data, keys_first=scores.keys_first)   # dPd = G v^T
            if keep is not None:
                dP.array *= keep
                dP.array *= drop_scale
            dS = dP.softmax_backward_(scores, scale)              # dS * s, in dP's buffer
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
    d = pred - target
    return (d * d).mean()


def int_ids(ids):
    """Integer indices as a backend array (accepts Tensors, NumPy/CuPy arrays and lists)."""
    if isinstance(ids, Tensor):
        ids = ids.data
    arr = backend.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"expected integer token ids, got dtype {arr.dtype}")
    return arr
