"""The speed tricks: the fast way to compute what `functional`'s fused ops (and `optim`'s AdamW)
define, each NumPy version beside its CuPy twin.

`functional` is where an op is *defined*: its formula, its hand-derived backward, and the plainest
array code for both. Whatever a function does only to be fast lives here instead, under a name
that says what it computes, so that the definition can be read without it. That is:

* in-place sequences of NumPy operations (`out=`, `*=`) in place of whole-array expressions: each
  `a * b + c` would allocate a temporary the size of the array and walk memory once per operator;
* walking long arrays in cache-sized chunks (GELU, AdamW), and over the CPU's cores (`parallel`);
* memory layouts: attention's scores stored keys first (`AttentionScores`), its output stored so
  that putting the heads side by side is free, x W^T computed as (W x^T)^T for a few rows;
* a faster NumPy spelling of one call (a sorted `reduceat` for `np.add.at` over rows, a row max
  through a transposed copy);
* the fused CuPy kernels: on the GPU each formula is one `ElementwiseKernel`, a single pass over
  memory instead of one launch and one round trip through GPU memory per operator. They are
  compiled on first use, so importing minigrad never needs CuPy, and the tests check each against
  its NumPy twin.

What does not belong here: the math itself, and anything that changes it. A trick keeps the
operations of the formula (chunking and in-place sequences keep even their order, so those are
bit-identical to the whole-array version; a different BLAS call or summation order may differ in
the last bit, which the tests bound). How much each trick gains, and on what, is measured in
benchmarks/README.md, not here.

Every function takes and returns arrays of the current backend, and keeps the input dtype
(float32 for training, float64 for gradient checks). Python-float constants keep float32 arrays
float32 (NumPy's scalar rules); a 0-d float64 *array* would not, so none is used here.
"""

from __future__ import annotations

import math

import numpy as np

from . import backend, parallel

GELU_C = math.sqrt(2.0 / math.pi)  # GELU's tanh approximation: u = C (x + A x^3)
GELU_A = 0.044715


def _on_gpu() -> bool:
    return backend.get_backend() == "cupy"


def _numba():
    """The compiled CPU loops (`minigrad.cpu_kernels`) when they are in use, else None: on the
    NumPy backend with Numba installed, unless switched off (`backend.set_cpu_kernels`). Imported
    here, on first use, so that Numba is loaded only by those who run them."""
    if backend.get_cpu_kernels() != "numba" or _on_gpu():
        return None
    from . import cpu_kernels  # noqa: PLC0415

    return cpu_kernels


def row_loops_compiled() -> bool:
    """Do row-wise reductions (softmax over the last axis) run as compiled loops, at no cost per
    row? Then attention keeps its scores (..., Tq, Tk); see `scores_keys_first`."""
    return _numba() is not None


# ---------------------------------------------------------------------------------------------
# GELU
# ---------------------------------------------------------------------------------------------

ELEMENTWISE_CHUNK = 1 << 15  # elements per chunk of an elementwise formula: 128 KiB per float32 buffer


def _chunks(stop: int, size: int, start: int = 0):
    """Slices that cut range(start, stop) into pieces of at most `size` elements."""
    return (slice(s, min(s + size, stop)) for s in range(start, stop, size))


def _gelu_tanh_u(x, out):
    """out = tanh(u), u = C x (1 + A x^2): GELU's inner term, in place in `out` (x's size)."""
    np.multiply(x, x, out=out)
    out *= GELU_A
    out += 1.0
    out *= x
    out *= GELU_C        # u
    return np.tanh(out, out=out)


def gelu_forward(x):
    """y = 0.5 x (1 + tanh(u)),  u = C x (1 + A x^2)  (= C (x + A x^3), one multiply fewer)."""
    if _on_gpu():
        return _cupy_kernels().gelu_forward(x)
    if (jit := _numba()) is not None:
        return jit.gelu_forward_saving(x, keep_tanh=False)[0]
    return _gelu_forward_numpy(x, keep_tanh=False)[0]


def gelu_forward_saving(x):
    """-> (y, saved): GELU(x) and what `gelu_backward` can reuse (tanh(u) on NumPy; None on CuPy,
    whose fused backward kernel recomputes it for free).

    NumPy: in place, over chunks of ELEMENTWISE_CHUNK elements. Each formula is a sequence of ~10
    whole-array operations; on a whole (B, T, 4C) array every one of them streams megabytes through
    memory, while on a chunk the buffers stay in the core's L2 cache after the first touch. The
    same operations in the same order, so the result is bit-identical to the whole-array version.
    (`x * x`, never `x ** 3`: NumPy's float32 power ufunc has no fast path for the exponent 3.)
    """
    if _on_gpu():
        return _cupy_kernels().gelu_forward(x), None
    if (jit := _numba()) is not None:
        return jit.gelu_forward_saving(x, keep_tanh=True)
    return _gelu_forward_numpy(x, keep_tanh=True)


def _gelu_forward_numpy(x, keep_tanh):
    xf = x.reshape(-1)
    y = np.empty_like(xf)
    # tanh(u) for every element when backward will want it, else one chunk of scratch
    t = np.empty_like(xf) if keep_tanh else np.empty(min(xf.size, ELEMENTWISE_CHUNK), dtype=xf.dtype)
    for c in _chunks(xf.size, ELEMENTWISE_CHUNK):
        xc, yc = xf[c], y[c]
        tc = _gelu_tanh_u(xc, t[c] if keep_tanh else t[:c.stop - c.start])  # kept for backward
        np.add(tc, 1.0, out=yc)
        yc *= xc
        yc *= 0.5
    return y.reshape(x.shape), (t.reshape(x.shape) if keep_tanh else None)


def gelu_backward(x, g, tanh_u=None):
    """dL/dx = g * [0.5 (1 + t) + 0.5 x (1 - t^2) du/dx],  t = tanh(u),  du/dx = C (1 + 3A x^2).

    `tanh_u` is t as saved by `gelu_forward_saving` (memory the size of the MLP's hidden
    activations, per layer), which saves recomputing u and its tanh; without it, t is recomputed
    from x. NumPy: in place, chunk by chunk, as the forward pass.
    """
    if _on_gpu():
        return _cupy_kernels().gelu_backward(x, g)
    if (jit := _numba()) is not None:
        return jit.gelu_backward(x, g, tanh_u)
    xf, gf = x.reshape(-1), g.reshape(-1)
    tf = None if tanh_u is None else tanh_u.reshape(-1)
    dx = np.empty_like(xf)
    n = min(xf.size, ELEMENTWISE_CHUNK)
    t_buf, s_buf = np.empty(n, dtype=xf.dtype), np.empty(n, dtype=xf.dtype)
    for c in _chunks(xf.size, ELEMENTWISE_CHUNK):
        xc, gc, d = xf[c], gf[c], dx[c]
        k = c.stop - c.start
        sech2 = s_buf[:k]
        t = _gelu_tanh_u(xc, t_buf[:k]) if tf is None else tf[c]   # tf: read only
        np.multiply(xc, xc, out=d)
        d *= 3.0 * GELU_A
        d += 1.0
        d *= GELU_C                        # du/dx = C (1 + 3A x^2)
        d *= xc                            # x du/dx
        np.multiply(t, t, out=sech2)
        np.subtract(1.0, sech2, out=sech2)  # 1 - t^2 = sech^2 u
        d *= sech2                         # x (1 - t^2) du/dx
        np.add(t, 1.0, out=sech2)          # (the buffer is free again: 1 + t)
        d += sech2                         # (1 + t) + x (1 - t^2) du/dx
        d *= 0.5
        d *= gc
    return dx.reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# linear's matmul and embedding's gradient
# ---------------------------------------------------------------------------------------------

SKINNY_ROWS = 128  # up to this many rows, x W^T is computed as (W x^T)^T


def matmul_transposed(x, w):
    """x @ w^T for x (N, in) and w (out, in) -> (N, out), C-contiguous.

    For a few rows (generation, where the rows are the tokens of one sequence) BLAS is faster
    with the wide weight matrix as the left operand, so up to SKINNY_ROWS rows this computes
    (w x^T)^T and copies it back into row order.
    """
    if x.shape[0] <= SKINNY_ROWS:
        return backend.xp.ascontiguousarray((w @ x.T).T)
    return x @ w.T


def sum_rows_by_id(ids, rows, n):
    """(n, C) array whose row i is the sum of the `rows` (N, C) whose id in `ids` (N,) is i:
    `np.add.at(zeros, ids, rows)`, which sums a repeated id's rows instead of keeping the last.

    NumPy: `add.at` updates row by row, slowly; sorting the ids (stably) and summing each run of
    equal ids with one `reduceat` gives the same sums (up to rounding: `reduceat` may add in
    another order) in a few vector operations. CuPy's `add.at` is one scatter-add kernel already.
    """
    xp = backend.xp
    out = xp.zeros((n, rows.shape[1]), dtype=rows.dtype)
    if _on_gpu():
        xp.add.at(out, ids, rows)
        return out
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    out[sorted_ids[starts]] = np.add.reduceat(rows[order], starts, axis=0)
    return out


# ---------------------------------------------------------------------------------------------
# softmax (attention) and cross-entropy (the loss over the vocabulary)
# ---------------------------------------------------------------------------------------------

def softmax(z, axis=-1, out=None):
    """softmax along `axis`: e^(z - max) / sum e^(z - max). With `out=z` it overwrites z (attention
    does, on its scores: along their first axis when stored keys first, see
    `functional.scaled_dot_product_attention`, else their last).

    NumPy: the exponentials are computed in the output buffer, then divided in place: no
    temporary of z's size. CuPy: one fused kernel for the shifted exponentials.
    """
    if _on_gpu():
        return _cupy_kernels().softmax(z, axis, out)
    if (jit := _numba()) is not None and (p := jit.softmax(z, axis, out)) is not None:
        return p  # (along another axis than the last: the NumPy twin below)
    last = axis in (-1, z.ndim - 1)
    e = np.subtract(z, _row_max(z) if last else z.max(axis=axis, keepdims=True), out=out)
    np.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def scaled_masked_softmax_(S, scale, mask=None):
    """In place on attention's scores S (..., Tq, Tk): S <- softmax(S * scale, masked), the last
    axis; `mask` (Tq, Tk) is True where a query may not see a key (its score becomes -inf, its
    probability 0), or None. Returns S.

    NumPy (and CuPy): three passes, scale, mask (copyto with `where` broadcasts the mask over the
    batch axes), softmax. Numba: one loop over each row.
    """
    if (jit := _numba()) is not None and jit.scaled_masked_softmax_(S, scale, mask):
        return S
    xp = backend.xp
    S *= scale
    if mask is not None:
        xp.copyto(S, -xp.inf, where=mask)
    return softmax(S, -1, out=S)


def softmax_backward_(dP, P, axis, scale=1.0):
    """In place: dP <- P * (dP - sum_axis(dP * P)) * scale, softmax's backward (dP = dL/dP, P the
    softmax along `axis`) times a constant (attention's 1/sqrt(D)); returns dP.

    From dP_i/dz_j = P_i (delta_ij - P_j): dL/dz_j = P_j (dL/dP_j - sum_i dL/dP_i P_i).
    NumPy: four whole-array passes and one temporary of P's size. CuPy: the same operations.
    """
    if (jit := _numba()) is not None and jit.softmax_backward_(dP, P, axis, scale):
        return dP
    xp = backend.xp
    dP_times_P = xp.multiply(dP, P)
    dP -= dP_times_P.sum(axis=axis, keepdims=True)
    dP *= P
    dP *= scale
    return dP


SHORT_ROW = 64  # rows up to this length take their max through a transposed copy (`_row_max`)


def _row_max(z):
    """z.max(axis=-1, keepdims=True), faster for short rows (attention scores at context <= 64).

    NumPy reduces each short row separately, at a fixed cost per row: for short rows that costs
    more than copying the scores transposed and taking the maxima over the other axis, which runs
    as whole-row elementwise `maximum` passes. A maximum does not depend on the order it is taken
    in, so both give the same numbers, bit for bit.
    """
    if z.ndim < 2 or z.shape[-1] > SHORT_ROW:
        return z.max(axis=-1, keepdims=True)
    zt = np.ascontiguousarray(np.swapaxes(z, -1, -2))  # (..., n, rows): row r is column r now
    return np.expand_dims(zt.max(axis=-2), -1)


def softmax_cross_entropy(z, t_safe, valid):
    """Rows z (N, V), targets (N,) -> (per-row losses (N,), probabilities (N, V)).

    loss_r = log sum_j e^(z_rj - m_r) - (z_rt - m_r)   (m_r the row max: no overflow, and the
    small log term is not rounded away next to a large max). The probabilities are returned for
    the backward pass, which turns them into the gradient in place (`cross_entropy_grad_`).
    """
    xp = backend.xp
    if (jit := _numba()) is not None:
        return jit.softmax_cross_entropy(z, t_safe, valid)
    if _on_gpu():
        probs, m, sums = _cupy_kernels().exp_shifted_rows(z)
    else:
        m = z.max(axis=1, keepdims=True)
        probs = np.subtract(z, m)          # one (N, V) buffer: shifted logits, then e^..., then p
        np.exp(probs, out=probs)
        sums = probs.sum(axis=1, keepdims=True)
    rows = xp.arange(z.shape[0])
    losses = (xp.log(sums)[:, 0] - (z[rows, t_safe] - m[:, 0])) * valid
    probs /= sums
    return losses, probs


def cross_entropy_grad_(probs, t_safe, row_scale):
    """In place: probs (N, V) becomes (probs - onehot(t)) * row_scale[:, None], the gradient of
    the mean cross-entropy (row_scale = upstream gradient / count, 0 for ignored rows)."""
    xp = backend.xp
    if _on_gpu():
        _cupy_kernels().xent_grad(probs, t_safe, row_scale)
        return probs
    if (jit := _numba()) is not None:
        return jit.cross_entropy_grad_(probs, t_safe, row_scale)
    probs[xp.arange(probs.shape[0]), t_safe] -= 1.0
    probs *= row_scale[:, None]
    return probs


# ---------------------------------------------------------------------------------------------
# attention: where the (..., Tq, Tk) score matrices live, and where the output goes
# ---------------------------------------------------------------------------------------------

def scores_keys_first(rows: int, Tk: int) -> bool:
    """Store attention's scores keys first when there are many rows (queries x batch x heads)
    for their length Tk (see `AttentionScores`). Not with compiled row loops
    (`row_loops_compiled`), which pay nothing per row: the copies into that layout would then be
    pure cost."""
    return rows >= 2 * Tk and not row_loops_compiled()


_BIAS_CACHE: dict = {}
_BIAS_CACHE_MAX = 1 << 22  # elements: a larger bias is built broadcastable instead of whole


class AttentionScores:
    """Attention's score matrices a b^T (times `scale`), for a (..., Tq, D) and b (..., Tk, D),
    stored in the memory layout that suits their shape. `.array` is the (..., Tq, Tk) view that
    the math reads; `.buf` the storage, whose rows of scores run along `.axis`.

    Why a layout: softmax and its backward reduce every query's row of Tk scores. Stored as
    (..., Tq, Tk), that is one short reduction per row, and NumPy pays a fixed cost per row,
    as much as the arithmetic for short rows. So when there are many rows, the scores are
    stored *keys first*, buf (Tk, ..., Tq): S[..., i, j] lives at buf[j, ..., i], a query's
    scores run down axis 0, and each reduction is Tk whole-array vector operations over long
    contiguous rows. b a^T, contiguous (..., Tk, Tq), is computed as usual and copied into that
    layout in the pass that scales it; the matmuls after it read `.array` through transposed
    views (BLAS takes transposed operands as they are), and the elementwise passes run on the
    buffer itself. With few rows (generation with a KV cache: one query per sequence) the scores
    are stored (..., Tq, Tk), and `.buf` is `.array`.

    `keys_first` chooses the layout (default: by shape, `scores_keys_first`); a gradient uses
    its forward's, so that the two buffers line up element for element.
    """

    def __init__(self, a, b, scale=None, keys_first=None):
        xp = backend.xp
        *batch, Tq, _ = a.shape
        Tk = b.shape[-2]
        if keys_first is None:
            keys_first = scores_keys_first(math.prod(batch) * Tq, Tk)
        self.keys_first = keys_first
        if keys_first:
            baT = xp.moveaxis(b @ xp.swapaxes(a, -1, -2), -2, 0)  # (Tk, ..., Tq) view of b a^T
            self.buf = xp.empty((Tk, *batch, Tq), dtype=a.dtype)  # buf[j, ..., i] = S[..., i, j]
            if scale is None:
                xp.copyto(self.buf, baT)
            else:
                xp.multiply(baT, scale, out=self.buf)                # scaled, copied keys first
            self.array, self.axis = xp.moveaxis(self.buf, 0, -1), 0
        else:
            self.buf = self.array = a @ xp.swapaxes(b, -1, -2)      # (..., Tq, Tk)
            self.axis = -1
        # Queries first, the scale waits for `softmax_`, which applies it in the same loop as the
        # mask and the softmax (one pass where row loops are compiled); keys first it is applied
        # in the copy above.
        self.pending_scale = None if keys_first else scale

    def softmax_(self, causal_mask=None):
        """In place: the scores (times the scale, if it is still pending), with -inf where
        `causal_mask(Tq, Tk)` is True (`functional.causal_mask`, passed in so the mask has one
        definition; None: no mask), become softmax over each query's row; returns `.array`.

        Keys first, a cached 0/-inf bias is added: one pass over the buffer with a same-shape
        operand, where broadcasting a (Tk, 1, Tq) mask would run n * Tk short loops. Queries first,
        `scaled_masked_softmax_` (one query, the newest, sees every key: nothing to mask)."""
        Tq, Tk = self.array.shape[-2:]
        if self.keys_first:
            if causal_mask is not None:
                flat = self.buf.reshape(Tk, -1, Tq)
                flat += _causal_bias_keys_first(causal_mask, Tq, Tk, flat.shape[1], self.buf.dtype)
            softmax(self.buf, self.axis, out=self.buf)
        else:
            mask = causal_mask(Tq, Tk) if causal_mask is not None and Tq > 1 else None
            scale = 1.0 if self.pending_scale is None else self.pending_scale
            scaled_masked_softmax_(self.buf, scale, mask)
            self.pending_scale = None
        return self.array

    def softmax_backward_(self, P, scale):
        """In place, for these scores holding dP = dL/dP: dS = P (dP - rowsum(dP P)) * scale, with
        P the forward's `AttentionScores` after `softmax_` (in the same layout); returns `.array`."""
        softmax_backward_(self.buf, P.buf, self.axis, scale)
        return self.array


def _causal_bias_keys_first(causal_mask, Tq: int, Tk: int, n: int, dtype):
    """0 / -inf of shape (Tk, n, Tq) for scores stored keys first, (Tk, n sequences x heads, Tq):
    -inf where query i may not see key j. Kept for the last shape asked (every layer of a forward
    pass asks for the same one); above _BIAS_CACHE_MAX elements it stays (Tk, 1, Tq)."""
    xp = backend.xp
    key = (Tq, Tk, n, np.dtype(dtype).str, backend.get_backend())
    if key not in _BIAS_CACHE:
        bias = xp.where(causal_mask(Tq, Tk).T[:, None, :], -xp.inf, 0.0).astype(dtype)  # (Tk, 1, Tq)
        if Tk * n * Tq <= _BIAS_CACHE_MAX:
            bias = xp.ascontiguousarray(xp.broadcast_to(bias, (Tk, n, Tq)))
        _BIAS_CACHE.clear()
        _BIAS_CACHE[key] = bias
    return _BIAS_CACHE[key]


def attention_output(P, v):
    """P @ v for P (..., Tq, Tk) and v (..., Tk, D) -> (..., Tq, D), stored with the query axis
    before the last batch axis: (B, Tq, H, D) for (B, H, Tq, D), so that putting the heads side by
    side again, (B, Tq, H * D), is a view, not a copy."""
    xp = backend.xp
    *batch, Tq, _ = P.shape
    D = v.shape[-1]
    if not batch:
        return xp.matmul(P, v, out=xp.empty((Tq, D), dtype=P.dtype))
    o = xp.empty((*batch[:-1], Tq, batch[-1], D), dtype=P.dtype)
    o = xp.moveaxis(o, -3, -2)                                   # (..., Tq, D) view
    xp.matmul(P, v, out=o)
    return o


# ---------------------------------------------------------------------------------------------
# layer norm over the last axis
# ---------------------------------------------------------------------------------------------

def layer_norm_forward(x, weight, bias, eps):
    """-> (y, mean, rstd): y = (x - mean) * rstd * w + b, with mean and rstd of shape (..., 1)."""
    xp = backend.xp
    if (jit := _numba()) is not None:
        return jit.layer_norm_forward(x, weight, bias, eps)
    mean = x.mean(axis=-1, keepdims=True)
    if _on_gpu():
        var = _cupy_kernels().sq_dev_mean(x, mean)
        rstd = 1.0 / xp.sqrt(var + eps)
        y = _cupy_kernels().layer_norm_apply(x, mean, rstd, weight, bias)
        return y, mean, rstd
    y = np.subtract(x, mean)                  # x - mean, in the output buffer
    var = np.einsum("...c,...c->...", y, y)[..., None]  # sum of squares without a temporary
    var /= x.shape[-1]
    var += eps
    rstd = np.sqrt(var, out=var)
    np.divide(1.0, rstd, out=rstd)
    y *= rstd                                 # xhat
    if weight is not None:
        y *= weight
    if bias is not None:
        y += bias
    return y, mean, rstd


def layer_norm_backward(x, mean, rstd, weight, g, need_dx=True):
    """-> (dx, dw, db) for y = xhat * w + b (dw/db summed over all rows; None where not asked).

      dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = g * w.
    """
    C = x.shape[-1]
    if _on_gpu():
        return _cupy_kernels().layer_norm_backward(x, mean, rstd, weight, g, need_dx)
    if (jit := _numba()) is not None:
        return jit.layer_norm_backward(x, mean, rstd, weight, g, need_dx)
    xhat = np.subtract(x, mean)
    xhat *= rstd
    g2 = g.reshape(-1, C)
    dw = np.einsum("nc,nc->c", g2, xhat.reshape(-1, C)) if weight is not None else None
    db = g2.sum(axis=0)
    if not need_dx:
        return None, dw, db
    dxhat = g * weight if weight is not None else g.copy()
    a = dxhat.mean(axis=-1, keepdims=True)
    b = np.einsum("...c,...c->...", dxhat, xhat)[..., None]
    b /= C
    xhat *= b
    dxhat -= a
    dxhat -= xhat
    dxhat *= rstd
    return dxhat, dw, db


# ---------------------------------------------------------------------------------------------
# AdamW's update
# ---------------------------------------------------------------------------------------------

ADAMW_PARALLEL_MIN = 1 << 18  # elements per thread at least, for a parameter to be split
ADAMW_CHUNK = 1 << 16  # elements per chunk: 4 arrays x 256 KiB stay in a core's L2 cache


def adamw_update_(w, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """One AdamW step for one parameter, in place on w, m, v (g is read only):

        w <- w (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        w <- w - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    NumPy: the same operations in the same order (so results are bit-identical to the
    whole-array version), but over chunks of ADAMW_CHUNK elements. Done on whole arrays, every
    one of the ~12 operations streams all four 650 MB arrays through memory; per chunk, the
    chunk is loaded from memory once and the other operations hit the cache. A parameter of at
    least 2 x ADAMW_PARALLEL_MIN elements is cut into one piece per core, updated side by side
    (`parallel`): each element still goes through the same operations, so the numbers are the same.
    """
    if _on_gpu():
        _cupy_kernels().adamw(w, g, m, v, lr, beta1, beta2, eps, weight_decay, step)
        return
    if (jit := _numba()) is not None:
        if not (w.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):
            raise ValueError("adamw_update_ needs C-contiguous parameter and state arrays")
        jit.adamw_update_(w, g, m, v, lr, beta1, beta2, eps, weight_decay, step)
        return
    step_size = lr / (1 - beta1 ** step)
    bc2_sqrt = math.sqrt(1 - beta2 ** step)
    decay = 1 - lr * weight_decay
    if not (w.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):
        raise ValueError("adamw_update_ needs C-contiguous parameter and state arrays")
    wf, mf, vf = w.reshape(-1), m.reshape(-1), v.reshape(-1)  # views (contiguous)
    gf = g.reshape(-1)  # a view, or a copy when g is not contiguous (it is only read)

    def update(piece):
        start, stop = piece
        t_buf = np.empty(min(stop - start, ADAMW_CHUNK), dtype=w.dtype)  # scratch, one per thread
        for c in _chunks(stop, ADAMW_CHUNK, start):
            wc, gc, mc, vc, t = wf[c], gf[c], mf[c], vf[c], t_buf[:c.stop - c.start]
            if weight_decay != 0:
                wc *= decay
            mc *= beta1
            np.multiply(gc, 1 - beta1, out=t)
            mc += t                            # m = b1 m + (1 - b1) g
            vc *= beta2
            np.multiply(gc, gc, out=t)
            t *= 1 - beta2
            vc += t                            # v = b2 v + (1 - b2) g^2
            np.sqrt(vc, out=t)
            t /= bc2_sqrt
            t += eps                           # denominator
            np.divide(mc, t, out=t)
            t *= step_size
            wc -= t

    parallel.run(update, parallel.pieces(wf.shape[0], ADAMW_PARALLEL_MIN, align=ADAMW_CHUNK))


# ---------------------------------------------------------------------------------------------
# CuPy kernels (compiled on first use)
# ---------------------------------------------------------------------------------------------

_KERNELS = None


def _cupy_kernels():
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _CupyKernels(backend.xp)
    return _KERNELS


class _CupyKernels:
    """Fused GPU kernels. `T` is the array's float type (float or double), so the same kernel
    serves float32 training and float64 gradient checks. Each mirrors the NumPy twin above."""

    def __init__(self, cp):
        self.cp = cp
        self.gelu_forward = cp.ElementwiseKernel(
            "T x", "T y",
            f"""
            T u = (T){GELU_C!r} * x * ((T)1 + (T){GELU_A!r} * x * x);
            y = (T)0.5 * x * ((T)1 + tanh(u));
            """, "minigrad_gelu_fwd")
        self.gelu_backward = cp.ElementwiseKernel(
            "T x, T g", "T dx",
            f"""
            T t = tanh((T){GELU_C!r} * x * ((T)1 + (T){GELU_A!r} * x * x));
            T dudx = (T){GELU_C!r} * ((T)1 + (T)(3 * {GELU_A!r}) * x * x);
            dx = g * (T)0.5 * (((T)1 + t) + x * ((T)1 - t * t) * dudx);
            """, "minigrad_gelu_bwd")
        # exp(z - m) for a row max m broadcast over the row
        self._exp_shift = cp.ElementwiseKernel(
            "T z, T m", "T e", "e = exp(z - m);", "minigrad_exp_shift")
        # sum over the last axis of (x - mean)^2 (divided by C afterwards: the biased variance)
        self._sq_dev = cp.ReductionKernel(
            "T x, T mean", "T var", "(x - mean) * (x - mean)", "a + b", "var = a", "0",
            "minigrad_sq_dev_sum")
        self._ln_apply = cp.ElementwiseKernel(
            "T x, T mean, T rstd, T w, T b", "T y",
            "y = (x - mean) * rstd * w + b;", "minigrad_layer_norm_apply")
        self._ln_dx = cp.ElementwiseKernel(
            "T x, T mean, T rstd, T dxhat, T a, T b", "T dx",
            "dx = rstd * (dxhat - a - (x - mean) * rstd * b);", "minigrad_layer_norm_dx")
        # cross-entropy's gradient: (p - [j == t]) * scale, the column index j = i % V
        self._xent_grad = cp.ElementwiseKernel(
            "int64 t, T scale, int64 V", "T p",
            "p = (p - (T)((i % V) == t)) * scale;", "minigrad_xent_grad")
        self._adamw = cp.ElementwiseKernel(
            "T g, T b1, T b2, T eps, T decay, T step_size, T bc2_sqrt", "T w, T m, T v",
            """
            w = w * decay;
            m = b1 * m + ((T)1 - b1) * g;
            v = b2 * v + ((T)1 - b2) * (g * g);
            w = w - step_size * (m / (sqrt(v) / bc2_sqrt + eps));
            """, "minigrad_adamw")

    def softmax(self, z, axis, out):
        m = z.max(axis=axis, keepdims=True)
        e = self._exp_shift(z, m) if out is None else self._exp_shift(z, m, out)
        e /= e.sum(axis=axis, keepdims=True)
        return e

    def exp_shifted_rows(self, z):
        m = z.max(axis=1, keepdims=True)
        e = self._exp_shift(z, m)
        return e, m, e.sum(axis=1, keepdims=True)

    def xent_grad(self, probs, t_safe, row_scale):
        N, V = probs.shape
        t = t_safe.astype(self.cp.int64)
        self._xent_grad(t[:, None], row_scale.astype(probs.dtype)[:, None], V, probs)

    def sq_dev_mean(self, x, mean):
        var = self._sq_dev(x, mean, axis=-1, keepdims=True)
        var /= x.shape[-1]
        return var

    def layer_norm_apply(self, x, mean, rstd, weight, bias):
        one = x.dtype.type(1)
        w = weight if weight is not None else one
        b = bias if bias is not None else x.dtype.type(0)
        return self._ln_apply(x, mean, rstd, w, b)

    def layer_norm_backward(self, x, mean, rstd, weight, g, need_dx):
        cp = self.cp
        C = x.shape[-1]
        xhat = (x - mean) * rstd
        g2 = g.reshape(-1, C)
        dw = (g2 * xhat.reshape(-1, C)).sum(axis=0) if weight is not None else None
        db = g2.sum(axis=0)
        if not need_dx:
            return None, dw, db
        dxhat = g * weight if weight is not None else g
        a = dxhat.mean(axis=-1, keepdims=True)
        b = cp.mean(dxhat * xhat, axis=-1, keepdims=True)
        return self._ln_dx(x, mean, rstd, dxhat, a, b), dw, db

    def adamw(self, w, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
        T = w.dtype.type
        self._adamw(g, T(beta1), T(beta2), T(eps), T(1 - lr * weight_decay), T(lr / (1 - beta1 ** step)),
                    T(math.sqrt(1 - beta2 ** step)), w, m, v)
