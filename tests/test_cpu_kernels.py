"""The compiled CPU loops (`minigrad.cpu_kernels`, Numba) against their NumPy twins (`minigrad.kernels`).

Every kernel is run both ways on the same data, in float32 and float64, through the public
functions of `minigrad.kernels` with the switch (`backend.cpu_kernels`) set to "numba" and then
to "numpy". Tolerances: float64 agrees to ~1e-12 relative (only the order of additions differs);
float32 to ~1e-5 relative (the twins sum in float32, the loops in float64, and the loops' tanh is
computed through exp). AdamW's loop does the twin's operations in the twin's order and must agree
to the last bit. Then the fused ops are gradchecked (float64, finite differences) with Numba on.
The switch itself is tested too, including the environment variable and the path without Numba.
Every test runs with the loops' serial and their parallel versions (`loop_kind`).

Without Numba installed the Numba half skips; the NumPy twins are what the rest of the suite runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minigrad as mg
from minigrad import backend, kernels
from minigrad import functional as F

ROOT = Path(__file__).resolve().parents[1]
needs_numba = pytest.mark.skipif(not backend.numba_installed(), reason="Numba is not installed")

TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}
DTYPES = [np.float32, np.float64]


@pytest.fixture(autouse=True, params=["serial", "parallel"])
def loop_kind(request, monkeypatch):
    """Each loop is compiled twice (`cpu_kernels._Loop`); the test arrays are small, so they take
    the serial one unless PARALLEL_MIN is 0 (then on two threads): both are tested."""
    if request.param == "parallel" and backend.numba_installed():
        from minigrad import cpu_kernels, parallel

        monkeypatch.setattr(cpu_kernels, "PARALLEL_MIN", 0)
        saved = parallel.num_threads()
        parallel.set_num_threads(2)
        yield request.param
        parallel.set_num_threads(saved)
    else:
        yield request.param


def rand(*shape, seed=0, scale=1.0, dtype=np.float64):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def both(fn):
    """fn() with the Numba loops, then with the NumPy twins (fresh copies of any arrays fn changes
    are the caller's business)."""
    with backend.cpu_kernels("numba"):
        fast = fn()
    with backend.cpu_kernels("numpy"):
        slow = fn()
    return fast, slow


def assert_all_close(fast, slow, dtype):
    fast = fast if isinstance(fast, tuple) else (fast,)
    slow = slow if isinstance(slow, tuple) else (slow,)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, **TOL[dtype])


# --- each kernel equal to its twin -----------------------------------------------------------------

@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_equals_twin(dtype):
    x = rand(3, 7, 40, scale=3.0, dtype=dtype)
    x.flat[:4] = [0.0, 1e-8, 30.0, -30.0]   # tanh's edges: 0, tiny, saturated both ways
    g = rand(3, 7, 40, seed=1, dtype=dtype)
    assert_all_close(*both(lambda: kernels.gelu_forward(x)), dtype)
    (y_f, t_f), (y_s, t_s) = both(lambda: kernels.gelu_forward_saving(x))
    assert_all_close((y_f, t_f), (y_s, t_s), dtype)
    # backward: in the tails (|x| > 3) 1 - tanh^2 u cancels, and float32's tanh, within half an
    # ulp of +-1, leaves ~1e-6 of absolute error in both versions (the loop's is the smaller,
    # against float64); so the float32 comparison there is absolute, to 5e-6
    tol = dict(rtol=2e-5, atol=5e-6) if dtype == np.float32 else TOL[dtype]
    for saved in (None, t_s):
        fast, slow = both(lambda saved=saved: kernels.gelu_backward(x, g, saved))
        assert fast.dtype == slow.dtype == dtype
        np.testing.assert_allclose(fast, slow, **tol)


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-1, 0, 1])   # the loops cover the last axis; the others fall back
def test_softmax_equals_twin(dtype, axis):
    z = rand(7, 5, 9, scale=4.0, dtype=dtype)
    z[1, 2, :3] = -np.inf                         # masked entries, as attention's
    assert_all_close(*both(lambda: kernels.softmax(z, axis)), dtype)

    def in_place():
        buf = z.copy()
        out = kernels.softmax(buf, axis, out=buf)
        assert out is buf
        return buf
    assert_all_close(*both(in_place), dtype)

    P = kernels.softmax(z, axis)
    dP = rand(*z.shape, seed=3, dtype=dtype)
    scale = dtype(0.125)
    assert_all_close(*both(lambda: kernels.softmax_backward_(dP.copy(), P, axis, scale)), dtype)


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [True, False])
def test_attention_softmax_equals_twin(dtype, masked):
    S = rand(2, 3, 5, 7, scale=3.0, dtype=dtype)             # (B, H, Tq, Tk): 5 queries, 7 keys
    mask = F.causal_mask(5, 7) if masked else None
    fast, slow = both(lambda: kernels.scaled_masked_softmax_(S.copy(), dtype(0.3), mask))
    assert_all_close(fast, slow, dtype)
    if masked:
        assert (fast[..., mask] == 0).all()


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_and_its_gradient_equal_twins(dtype):
    z = rand(9, 300, scale=5.0, dtype=dtype)
    z[0] += 1e4                                   # large logits: the max is subtracted first
    t = np.random.default_rng(2).integers(0, 300, 9)
    valid = np.ones(9, dtype=bool)
    valid[4] = False                              # an ignored row: loss 0, gradient 0
    t_safe = np.where(valid, t, 0)
    (loss_f, p_f), (loss_s, p_s) = both(lambda: kernels.softmax_cross_entropy(z, t_safe, valid))
    assert_all_close((loss_f, p_f), (loss_s, p_s), dtype)
    assert loss_f[4] == 0
    scale = (valid * 0.37).astype(dtype)
    assert_all_close(*both(lambda: kernels.cross_entropy_grad_(p_s.copy(), t_safe, scale)), dtype)


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_equals_twin(dtype, affine):
    x = rand(5, 17, 24, scale=2.0, dtype=dtype) + dtype(1.5)   # 85 rows: 3 pieces, a ragged last
    w = rand(24, seed=1, dtype=dtype) + dtype(1) if affine else None
    b = rand(24, seed=2, dtype=dtype) if affine else None
    g = rand(5, 17, 24, seed=3, dtype=dtype)
    (y, mean, rstd), twin = both(lambda: kernels.layer_norm_forward(x, w, b, 1e-5))
    assert_all_close((y, mean, rstd), twin, dtype)
    for need_dx in (True, False):
        assert_all_close(*both(lambda n=need_dx: kernels.layer_norm_backward(x, mean, rstd, w, g, n)), dtype)


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_equals_twin_bit_for_bit(dtype, wd):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((33, 17)).astype(dtype)
    states = {name: [w0.copy(), np.zeros_like(w0), np.zeros_like(w0)] for name in ("numba", "numpy")}
    for step in range(1, 4):
        g = rng.standard_normal((17, 33)).astype(dtype).T   # not contiguous: read through a copy
        for name, (w, m, v) in states.items():
            with backend.cpu_kernels(name):
                kernels.adamw_update_(w, g, m, v, 1e-2, 0.9, 0.999, 1e-8, wd, step)
        for a, b in zip(*states.values()):
            assert a.dtype == dtype
            np.testing.assert_array_equal(a, b)


# --- the fused ops, gradchecked with Numba on ------------------------------------------------------

def t64(a):
    return mg.Tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


@needs_numba
@pytest.mark.parametrize("name", ["gelu", "layer_norm", "softmax", "cross_entropy", "attention",
                                  "attention_many_rows"])
def test_fused_ops_gradcheck_with_numba(name):
    targets = np.array([1, 0, 4, 2, 3, 3])
    ops = {
        "gelu": (lambda x: F.gelu(x), [t64(rand(4, 6, scale=2.0))]),
        "layer_norm": (lambda x, w, b: F.layer_norm(x, w, b),
                       [t64(rand(3, 8) + 1.0), t64(rand(8, seed=1)), t64(rand(8, seed=2))]),
        "softmax": (lambda x: F.softmax(x), [t64(rand(3, 5, scale=2.0))]),
        "cross_entropy": (lambda z: F.cross_entropy(z, targets), [t64(rand(6, 5, scale=2.0))]),
        # 2 x 2 x 4 rows of 4 keys: rows >= 2 Tk (keys first for the NumPy twins, not here)
        "attention_many_rows": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                                 [t64(rand(2, 2, 4, 3, seed=s)) for s in range(3)]),
        # 1 x 1 x 4 rows
        "attention": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                      [t64(rand(1, 1, 4, 3, seed=s)) for s in range(3)]),
    }
    op, inputs = ops[name]
    with backend.cpu_kernels("numba"):
        assert mg.gradcheck(op, *inputs)


@needs_numba
def test_a_training_step_agrees_with_the_twins():
    """A tiny GPT's loss and every gradient, float32, Numba against the NumPy twins."""
    from gpt2 import GPTConfig, GPTModel

    cfg = GPTConfig(vocab_size=50, context_length=16, emb_dim=32, n_heads=4, n_layers=2, dropout=0.0,
                    qkv_bias=True)
    ids = np.random.default_rng(0).integers(0, 50, (3, 16))

    def step():
        mg.manual_seed(0)
        model = GPTModel(cfg)
        loss = F.cross_entropy(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        return (loss.data,) + tuple(p.grad for p in model.parameters())
    fast, slow = both(step)
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)


# --- the switch ----------------------------------------------------------------------------------

def test_switch_rejects_unknown_names():
    with pytest.raises(ValueError, match="choose one of"):
        backend.set_cpu_kernels("fortran")


def test_numpy_twins_are_used_when_asked():
    with backend.cpu_kernels("numpy"):
        assert backend.get_cpu_kernels() == "numpy" and kernels._numba() is None
        assert not kernels.row_loops_compiled() and kernels.scores_keys_first(4 * 64, 64)


@needs_numba
def test_numba_is_used_by_default_where_installed():
    assert kernels._numba() is not None or os.environ.get("MINIGRAD_CPU_KERNELS") == "numpy"
    with backend.cpu_kernels("auto"):
        assert backend.get_cpu_kernels() == "numba"
        # rows cost nothing extra in the loops: attention's scores stay (..., Tq, Tk)
        assert kernels.row_loops_compiled() and not kernels.scores_keys_first(12 * 4 * 64, 64)


def _run(code, **env):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          cwd=ROOT, timeout=120)


def test_environment_variable_chooses_and_numba_is_not_loaded_for_the_twins():
    code = ("import sys, numpy as np, minigrad as mg; from minigrad import kernels; "
            "kernels.gelu_forward(np.ones(3, np.float32)); "
            "print(mg.backend.get_cpu_kernels(), 'numba' in sys.modules)")
    out = _run(code, MINIGRAD_CPU_KERNELS="numpy")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["numpy", "False"]


def test_without_numba_everything_falls_back_to_the_twins():
    # sys.modules["numba"] = None: `import numba` fails and find_spec says "not installed", as on a
    # machine without it. "auto" gives the twins, a training step runs, and asking for "numba"
    # explicitly is a clear error.
    code = ("import sys; sys.modules['numba'] = None\n"
            "import numpy as np, minigrad as mg\n"
            "from minigrad import functional as F\n"
            "assert mg.backend.get_cpu_kernels() == 'numpy'\n"
            "x = mg.Tensor(np.ones((2, 4), np.float32), requires_grad=True)\n"
            "F.gelu(F.layer_norm(x)).sum().backward()\n"
            "try:\n"
            "    mg.backend.set_cpu_kernels('numba')\n"
            "except mg.BackendError as e:\n"
            "    print('error:', e)\n")
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert "Numba is not installed" in out.stdout
