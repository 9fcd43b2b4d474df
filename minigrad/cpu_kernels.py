"""Compiled CPU kernels (Numba): the hot loops of training as the per-element loops llm.c writes.

`minigrad.kernels` has each hot formula twice: a NumPy "twin" (a chain of whole-array passes, each
one NumPy call on one core) and a fused CuPy kernel for the GPU. This module is the third version,
the CPU counterpart of the CuPy kernels: the same formula written once per element (or per row),
compiled by Numba to machine code and spread over the cores with `prange`. One pass over memory
instead of ten, no temporaries, and every core instead of one. Each loop below is the derivation of
its op in code (`minigrad.functional` derives them in its docstrings).

When they are used: on the NumPy backend, when Numba is installed, unless MINIGRAD_CPU_KERNELS=numpy
(or `backend.set_cpu_kernels("numpy")`) asks for the NumPy twins; see `backend.get_cpu_kernels`.
`minigrad.kernels` imports this module (and with it Numba, ~0.3 s) only then, on first use, so
`import minigrad` stays fast and the CuPy path never loads it.

Compilation. Each loop is compiled the first time it is called with a new dtype (float32 for
training, float64 for gradient checks), and cached on disk (`cache=True`: in __pycache__ beside
this file, or NUMBA_CACHE_DIR): later processes load the machine code instead of compiling it.
benchmarks/README.md states what the first call costs, compiled and cached.

Dtypes. A Python float literal is a float64 in Numba, so `x * 0.5` on a float32 x would be computed
in float64. Every constant is therefore made with the array's own type (`T = x.dtype.type`,
`T(0.5)`), or passed in as one: float32 arrays are computed in float32, as by the NumPy twins. The
sums over a row (softmax's and cross-entropy's normaliser, layer norm's mean and variance, the dot
products of the backward passes) are accumulated in float64: a scalar, so cheap, and no less
accurate than NumPy's pairwise sums. Results agree with the twins to float32 rounding (the tests
state the tolerances); AdamW's loop does the twin's operations in the twin's order.

Threads: Numba's thread count follows `minigrad.parallel.num_threads()` (MINIGRAD_NUM_THREADS,
OMP_NUM_THREADS, ..., else the cores), set before every call, so `parallel.set_num_threads` applies
here too. The loops run between BLAS calls, never during one, so Numba's threads and OpenBLAS's
take turns on the same cores instead of oversubscribing them.
"""

from __future__ import annotations

import math
import os
import types as types_

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from . import parallel

# Numba's "workqueue" threads sleep between loops, where its OpenMP threads spin for a while
# after each one, taking the core from OpenBLAS's threads (which spin too) and from the main
# thread. On a 2-core machine shared with other jobs, whole fwd+bwd ops ran 3-20x slower with
# OpenMP than with the workqueue. Workqueue cannot run two loops at once from two threads; ours
# never release the GIL, so two never run at once. NUMBA_THREADING_LAYER chooses otherwise.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

GELU_C = math.sqrt(2.0 / math.pi)  # the same constants as minigrad.kernels (which imports us)
GELU_A = 0.044715

_threads_set: int | None = None


def _follow_thread_count() -> None:
    """Numba's thread count := minigrad's (capped by the threads Numba started with)."""
    global _threads_set
    n = parallel.num_threads()
    if n != _threads_set:
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
        _threads_set = n


# ---------------------------------------------------------------------------------------------
# The loops. `prange` spreads the outer loop over the threads; everything else is plain code.
# ---------------------------------------------------------------------------------------------

# --- each loop compiled twice --------------------------------------------------------------

PARALLEL_MIN = 1 << 17  # elements of work at least, for a loop to be spread over the threads


class _Loop:
    """A loop compiled twice: spread over the threads (`prange`), and on the calling thread alone
    (where `prange` is `range`). Waking the other threads costs far more than a serial call's ~2
    µs: ~100-250 µs per call on this 2-core VM while it was busy with other jobs. So work under
    PARALLEL_MIN elements (layer norm's rows at nanoGPT's Shakespeare size, every AdamW parameter
    there) runs serially, and larger work (GELU's activations, attention's scores, everything at
    GPT-2 124M) in parallel. `loop(work, *args)` picks one, for `work` elements."""

    def __init__(self, fn):
        self.py_func = fn
        # error_model="numpy": a division by zero gives inf or nan, as in NumPy. Numba's default
        # for plain njit ("python") tests every divisor and raises ZeroDivisionError, and that
        # branch keeps a loop from being vectorised: GELU's forward (two / (e^2u + 1)) took
        # 4.8 ms serially on 393K elements with it, 0.8 ms without. parallel=True already
        # compiles with NumPy's model; saying it for both keeps the two versions the same code.
        self.parallel = njit(parallel=True, error_model="numpy", cache=True)(fn)
        serial = types_.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial")
        serial.__qualname__ = fn.__qualname__ + "_serial"  # its own entry in the disk cache
        self.serial = njit(error_model="numpy", cache=True)(serial)

    def __call__(self, work, *args):
        _follow_thread_count()
        return (self.parallel if work >= PARALLEL_MIN else self.serial)(*args)


_loop = _Loop


# --- e^x, vectorised -----------------------------------------------------------------------
# Numba compiles math.exp to a call of the C library's exp, one element at a time: the loops
# around it cannot use SIMD, and a float32 exp costs several ns, ~2x NumPy's vectorised one. So
# float32 gets its own exp in plain arithmetic (Cephes' expf), which the compiler vectorises:
#   e^x = 2^n e^r,  n = round(x / ln 2),  r = x - n ln 2 in [-ln2/2, ln2/2],
# e^r from a degree-7 polynomial (within 1 ulp, tested), and 2^n built from its bits: the float
# with exponent field n + 127 and a zero mantissa. ln 2 is split in two (LN2_HI has few bits, so
# n * LN2_HI is exact) to keep r accurate. float64 (gradient checks) keeps math.exp.

EXP_MAX, EXP_MIN = 88.37626, -87.33654   # beyond: inf (2^128 overflows) and 0 (below 2^-126)
LOG2E = 1.4426950408889634
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
            5.0000001201e-1)  # e^r = 1 + r + r^2 (P[5] + r (P[4] + ...)): Cephes' expf


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose 32 bits are the int32 `bits` (a reinterpretation, no conversion)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(inline="always", cache=True)
def _exp_float32(x):
    f = np.float32
    xc = min(max(x, f(EXP_MIN)), f(EXP_MAX))
    n = np.floor(xc * f(LOG2E) + f(0.5))              # a float32 holding an integer
    r = xc - n * f(LN2_HI) - n * f(LN2_LO)
    p = f(EXP_POLY[0])                                # Horner: P(r) = ((P0 r + P1) r + ...) + P5
    p = p * r + f(EXP_POLY[1])
    p = p * r + f(EXP_POLY[2])
    p = p * r + f(EXP_POLY[3])
    p = p * r + f(EXP_POLY[4])
    p = p * r + f(EXP_POLY[5])
    e = (p * r * r + r + f(1)) * _float32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))
    e = f(0) if x < f(EXP_MIN) else e                 # (e^-inf = 0: masked attention scores)
    e = f(np.inf) if x > f(EXP_MAX) else e
    return x if x != x else e                         # NaN stays NaN (the NaN guard needs it)


def _exp(x):
    """e^x, compiled per dtype (`_exp_for`)."""
    return math.exp(x)


@overload(_exp, inline="always")
def _exp_for(x):
    if x == types.float32:
        return lambda x: _exp_float32(x)
    return lambda x: math.exp(x)


# --- reductions over one row ---------------------------------------------------------------
# A sum is a chain: each addition waits for the one before (~4 cycles), one element at a time.
# `fastmath={"reassoc"}` lets the compiler keep several partial sums in SIMD lanes and add them at
# the end (a different order of additions, so the last bits may differ from NumPy's pairwise sum).
# The flags apply to the instructions of these helpers only, not to the loops that call them.
# Accumulated in float64.

@njit(fastmath={"reassoc"}, cache=True)
def _sum(a):
    """sum_i a_i"""
    total = 0.0
    for i in range(a.size):
        total += a[i]
    return total


@njit(fastmath={"reassoc"}, cache=True)
def _dot(a, b):
    """sum_i a_i b_i"""
    total = 0.0
    for i in range(a.size):
        total += a[i] * b[i]
    return total


@njit(fastmath={"reassoc"}, cache=True)
def _sum_sq_dev(a, mean):
    """sum_i (a_i - mean)^2"""
    total = 0.0
    for i in range(a.size):
        d = a[i] - mean
        total += d * d
    return total


@njit(fastmath={"reassoc"}, cache=True)
def _dot_centered(g, w, x, mean):
    """sum_i g_i w_i (x_i - mean)"""
    total = 0.0
    for i in range(g.size):
        total += g[i] * w[i] * (x[i] - mean)
    return total


@njit(fastmath={"nnan", "nsz"}, cache=True)
def _max(a):
    """max_i a_i. A maximum is exact in any order, but the compiler may only take it in SIMD lanes
    if it may ignore NaNs and the sign of zero (`nnan`, `nsz`): a NaN in the row is then not
    guaranteed to be the maximum, but it reaches the softmax's sum, and every output, anyway."""
    m = a[0]
    for i in range(1, a.size):
        m = a[i] if a[i] > m else m
    return m


@njit(inline="always", cache=True)
def _tanh(u, one, two):
    # tanh u = 1 - 2 / (e^2u + 1), for u >= 0; tanh(-u) = -tanh u. Numba's own tanh calls the C
    # library once per element, ~10x slower than NumPy's vectorised tanh; _exp vectorises. Taking |u|
    # keeps the result within half an ulp of +-1 in the tails (where GELU's backward computes
    # 1 - tanh^2, and the forward 1 + tanh): the small term 2 / (e^2|u| + 1) is exact there, and
    # e^2|u| = inf gives exactly 1, never inf / inf.
    return math.copysign(one - two / (_exp(two * abs(u)) + one), u)


# --- GELU: y = 0.5 x (1 + tanh u),  u = C x (1 + A x^2) ------------------------------------
@_loop
def _gelu_forward_loop(x, y, tanh_out, keep_tanh):
    T = x.dtype.type
    c, a, half, one, two = T(GELU_C), T(GELU_A), T(0.5), T(1), T(2)
    for i in prange(x.size):
        xi = x[i]
        t = _tanh(c * xi * (one + a * xi * xi), one, two)
        if keep_tanh:
            tanh_out[i] = t
        y[i] = half * xi * (one + t)


# dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx,  du/dx = C (1 + 3A x^2)
@_loop
def _gelu_backward_loop(x, g, tanh_u, have_tanh, dx):
    T = x.dtype.type
    c, a, a3, half, one, two = T(GELU_C), T(GELU_A), T(3 * GELU_A), T(0.5), T(1), T(2)
    for i in prange(x.size):
        xi = x[i]
        t = tanh_u[i] if have_tanh else _tanh(c * xi * (one + a * xi * xi), one, two)
        du_dx = c * (one + a3 * xi * xi)
        dx[i] = g[i] * half * ((one + t) + xi * (one - t * t) * du_dx)


# --- softmax over each row of a (R, n), in place: p_j = e^(a_j - max) / sum_k e^(a_k - max) ---
# (In place on one array: with two, the compiler cannot rule out that they overlap when they are
# the same buffer, attention's case, and falls back to one element at a time, ~4x slower.)
@_loop
def _softmax_rows_loop(a):
    R, n = a.shape
    for r in prange(R):
        m = _max(a[r])
        for j in range(n):
            a[r, j] = _exp(a[r, j] - m)  # a - m <= 0: no overflow; masked -inf gives 0
        s = a.dtype.type(_sum(a[r]))
        for j in range(n):
            a[r, j] /= s


# attention's: scores scaled, masked where mask[i, j] (query i may not see key j), then softmax
@_loop
def _scaled_masked_softmax_rows_loop(a, scale, mask, has_mask):
    R, n = a.shape
    Tq = mask.shape[0]
    minus_inf = a.dtype.type(-np.inf)
    for r in prange(R):
        if has_mask:
            i = r % Tq                               # the query of row r (rows: ..., Tq)
            for j in range(n):
                a[r, j] = minus_inf if mask[i, j] else a[r, j] * scale
        else:
            for j in range(n):
                a[r, j] *= scale
        m = _max(a[r])
        for j in range(n):
            a[r, j] = _exp(a[r, j] - m)
        s = a.dtype.type(_sum(a[r]))
        for j in range(n):
            a[r, j] /= s


# softmax's backward, in place: dz_j = p_j (dp_j - sum_k dp_k p_k), times attention's scale
@_loop
def _softmax_backward_rows_loop(d, p, scale):
    R, n = d.shape
    for r in prange(R):
        s = d.dtype.type(_dot(d[r], p[r]))
        for j in range(n):
            d[r, j] = p[r, j] * (d[r, j] - s) * scale


# --- cross-entropy of each row: loss = log sum_j e^(z_j - m) - (z_t - m) ---------------------
@_loop
def _softmax_cross_entropy_loop(z, t, valid, probs, losses):
    N, V = z.shape
    for r in prange(N):
        m = _max(z[r])
        for j in range(V):
            probs[r, j] = _exp(z[r, j] - m)
        s = z.dtype.type(_sum(probs[r]))
        for j in range(V):
            probs[r, j] /= s                       # kept for backward
        losses[r] = (math.log(s) - (z[r, t[r]] - m)) if valid[r] else z.dtype.type(0)


# its gradient, in place: (p_j - [j == t]) * scale_r  (scale_r = dL/dloss / count, or 0)
@_loop
def _cross_entropy_grad_loop(probs, t, row_scale):
    N, V = probs.shape
    one = probs.dtype.type(1)
    for r in prange(N):
        s = row_scale[r]
        p_target = probs[r, t[r]]
        for j in range(V):
            probs[r, j] *= s
        probs[r, t[r]] = (p_target - one) * s


# --- layer norm of each row: y = (x - mean) * rstd * w + b,  rstd = 1 / sqrt(var + eps) ------
@_loop
def _layer_norm_forward_loop(x, w, b, eps, y, mean_out, rstd_out):
    N, C = x.shape
    T = x.dtype.type
    for r in prange(N):
        mean = T(_sum(x[r]) / C)
        rstd = T(1.0 / math.sqrt(_sum_sq_dev(x[r], mean) / C + eps))    # biased variance, as GPT-2
        mean_out[r], rstd_out[r] = mean, rstd
        for c in range(C):
            y[r, c] = (x[r, c] - mean) * rstd * w[c] + b[c]


# Backward, as llm.c's layernorm_backward. With xhat = (x - mean) rstd, dxhat = g w:
#   dx = rstd (dxhat - mean_c(dxhat) - xhat mean_c(dxhat xhat)),
#   dw = sum over rows of g xhat,   db = sum over rows of g.
# dw and db are sums over all rows, which the threads cannot add into one array at once: each
# piece of `rows_per_piece` rows adds into its own row of dw_parts / db_parts (summed after).
@_loop
def _layer_norm_backward_loop(x, mean, rstd, w, g, need_dx, rows_per_piece, dx, dw_parts, db_parts):
    N, C = x.shape
    T = x.dtype.type
    for piece in prange(dw_parts.shape[0]):
        for r in range(piece * rows_per_piece, min(N, (piece + 1) * rows_per_piece)):
            mu, rs = mean[r], rstd[r]
            for c in range(C):
                dw_parts[piece, c] += g[r, c] * ((x[r, c] - mu) * rs)
                db_parts[piece, c] += g[r, c]
            if need_dx:
                # a = mean_c(dxhat), b = mean_c(dxhat xhat), with dxhat = g w, xhat = (x - mu) rs
                a = T(_dot(g[r], w) / C)
                b = T(_dot_centered(g[r], w, x[r], mu) * rs / C)
                for c in range(C):
                    xhat = (x[r, c] - mu) * rs
                    dx[r, c] = rs * (g[r, c] * w[c] - a - xhat * b)


# --- AdamW, element by element (the same operations, in the same order, as the NumPy twin) ---
@_loop
def _adamw_loop(w, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size,
                bc2_sqrt):
    for i in prange(w.size):
        gi = g[i]
        mi = m[i] * beta1 + gi * one_minus_beta1               # m = b1 m + (1 - b1) g
        vi = v[i] * beta2 + gi * gi * one_minus_beta2          # v = b2 v + (1 - b2) g^2
        m[i], v[i] = mi, vi
        # w (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
        w[i] = w[i] * decay - mi / (math.sqrt(vi) / bc2_sqrt + eps) * step_size


# ---------------------------------------------------------------------------------------------
# The wrappers: shapes, dtypes and output buffers in Python, the loops above in machine code.
# Each takes and returns what its twin in `minigrad.kernels` does.
# ---------------------------------------------------------------------------------------------

def _flat(a):
    return np.ascontiguousarray(a).reshape(-1)


def gelu_forward_saving(x, keep_tanh=True):
    """-> (y, tanh(u) or None), as `kernels.gelu_forward_saving` (keep_tanh=False: forward only)."""
    xf = _flat(x)
    y = np.empty_like(xf)
    t = np.empty_like(xf) if keep_tanh else np.empty(0, dtype=xf.dtype)
    _gelu_forward_loop(xf.size, xf, y, t, keep_tanh)
    return y.reshape(x.shape), (t.reshape(x.shape) if keep_tanh else None)


def gelu_backward(x, g, tanh_u=None):
    """dL/dx from x and g = dL/dy, reusing tanh(u) when given, as `kernels.gelu_backward`."""
    xf, gf = _flat(x), _flat(g)
    have = tanh_u is not None
    tf = _flat(tanh_u) if have else np.empty(0, dtype=xf.dtype)
    dx = np.empty_like(xf)
    _gelu_backward_loop(xf.size, xf, gf, tf, have, dx)
    return dx.reshape(x.shape)


def _rows(z, axis):
    """z as (R, n) rows for a reduction along `axis`, if that is its last axis and z is
    contiguous; else None (the caller then uses the NumPy twin)."""
    if not z.flags.c_contiguous or z.ndim == 0 or z.size == 0 or axis not in (-1, z.ndim - 1):
        return None
    return z.reshape(-1, z.shape[-1])


def softmax(z, axis, out):
    """softmax along the last axis, or None for another axis (not covered here)."""
    z2 = _rows(z, axis)
    if z2 is None or (out is not None and out is not z and not out.flags.c_contiguous):
        return None
    if out is None:
        out = z.copy()
    elif out is not z:
        np.copyto(out, z)
    _softmax_rows_loop(z.size, out.reshape(z2.shape))
    return out


def scaled_masked_softmax_(S, scale, mask):
    """In place: S <- softmax(S * scale, -inf where mask) along the last axis; False if S is not
    contiguous (not covered here)."""
    S2 = _rows(S, -1)
    if S2 is None:
        return False
    has_mask = mask is not None
    mask = np.ascontiguousarray(mask) if has_mask else np.zeros((1, S.shape[-1]), dtype=bool)
    if has_mask and mask.shape != S.shape[-2:]:
        return False
    _scaled_masked_softmax_rows_loop(S.size, S2, S.dtype.type(scale), mask, has_mask)
    return True


def softmax_backward_(dP, P, axis, scale):
    """In place: dP <- P * (dP - sum_axis dP * P) * scale along the last axis; False for
    another axis (not covered here)."""
    d2, p2 = _rows(dP, axis), _rows(P, axis)
    if d2 is None or p2 is None or dP.shape != P.shape:
        return False
    _softmax_backward_rows_loop(d2.size, d2, p2, P.dtype.type(scale))
    return True


def softmax_cross_entropy(z, t_safe, valid):
    """-> (losses (N,), probs (N, V)), as `kernels.softmax_cross_entropy`."""
    z = np.ascontiguousarray(z)
    probs = np.empty_like(z)
    losses = np.empty(z.shape[0], dtype=z.dtype)
    _softmax_cross_entropy_loop(z.size, z, t_safe.astype(np.int64, copy=False), valid, probs, losses)
    return losses, probs


def cross_entropy_grad_(probs, t_safe, row_scale):
    """In place: probs (N, V) becomes (probs - onehot(t)) * row_scale[:, None]."""
    _cross_entropy_grad_loop(probs.size, probs, t_safe.astype(np.int64, copy=False),
                             row_scale.astype(probs.dtype, copy=False))
    return probs


def _ones_or(w, C, dtype, fill):
    return np.full(C, fill, dtype=dtype) if w is None else np.ascontiguousarray(w, dtype=dtype)


def layer_norm_forward(x, weight, bias, eps):
    """-> (y, mean, rstd), mean and rstd of shape (..., 1), as `kernels.layer_norm_forward`."""
    C = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, C)
    y = np.empty_like(x2)
    mean = np.empty(x2.shape[0], dtype=x.dtype)
    rstd = np.empty(x2.shape[0], dtype=x.dtype)
    _layer_norm_forward_loop(x2.size, x2, _ones_or(weight, C, x.dtype, 1), _ones_or(bias, C, x.dtype, 0),
                             x.dtype.type(eps), y, mean, rstd)
    stats = x.shape[:-1] + (1,)
    return y.reshape(x.shape), mean.reshape(stats), rstd.reshape(stats)


LN_ROWS_PER_PIECE = 32  # rows whose dw, db are summed together before the pieces are added up


def layer_norm_backward(x, mean, rstd, weight, g, need_dx=True):
    """-> (dx, dw, db), as `kernels.layer_norm_backward` (None where not asked for)."""
    C = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, C)
    g2 = np.ascontiguousarray(g, dtype=x.dtype).reshape(-1, C)
    N = x2.shape[0]
    pieces = max(1, -(-N // LN_ROWS_PER_PIECE))
    dw_parts = np.zeros((pieces, C), dtype=x.dtype)
    db_parts = np.zeros((pieces, C), dtype=x.dtype)
    dx = np.empty_like(x2) if need_dx else np.empty((0, C), dtype=x.dtype)
    _layer_norm_backward_loop(x2.size, x2, _flat(mean), _flat(rstd), _ones_or(weight, C, x.dtype, 1), g2,
                              need_dx, LN_ROWS_PER_PIECE, dx, dw_parts, db_parts)
    dw = dw_parts.sum(axis=0) if weight is not None else None
    return (dx.reshape(x.shape) if need_dx else None), dw, db_parts.sum(axis=0)


def adamw_update_(w, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """One AdamW step in place on w, m, v, as `kernels.adamw_update_` (contiguous w, m, v)."""
    T = w.dtype.type
    wf, mf, vf = w.reshape(-1), m.reshape(-1), v.reshape(-1)
    gf = np.ascontiguousarray(g, dtype=w.dtype).reshape(-1)
    _adamw_loop(wf.size, wf, gf, mf, vf, T(beta1), T(1 - beta1), T(beta2), T(1 - beta2), T(eps),
                T(1 - lr * weight_decay), T(lr / (1 - beta1 ** step)), T(math.sqrt(1 - beta2 ** step)))
