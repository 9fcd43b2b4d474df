"""The CuPy stand-in holds the project to CuPy's rules, offers nothing CuPy lacks, and runs the
project's kernel sources on the CPU with CuPy's semantics.

Three kinds of test:
* the stand-in against the installed real CuPy (names, signatures, array attributes): the
  stand-in may only offer what CuPy 14.2 has;
* the project against the stand-in: every `xp.<name>` the project's code uses exists in it;
* the stand-in's own behaviour: host/device mix-ups raise TypeError, kernels follow CuPy's
  broadcasting, in-place and reduction rules, and a broken kernel fails with the compiler's message.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import tempfile
from pathlib import Path

import cupy_standin as cps
import numpy as np
import pytest
from cupy_standin import _array, _kernels, _signatures

import minigrad as mg
from minigrad import Tensor, kernels
from minigrad import functional as F

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def real_cupy():
    """The installed real CuPy (imported without a GPU; nothing here touches a device)."""
    if importlib.util.find_spec("cupy") is None:
        pytest.skip('real CuPy is not installed (pip install -e ".[gpu-check]")')
    # importing CuPy writes ~/.cupy unless told otherwise
    os.environ.setdefault("CUPY_CACHE_DIR", str(Path(tempfile.gettempdir()) / "minigrad-cupy-cache"))
    import cupy  # noqa: PLC0415

    return cupy


# ---------------------------------------------------------------------------------------------
# the stand-in offers nothing CuPy lacks
# ---------------------------------------------------------------------------------------------

def _compact(sig: inspect.Signature) -> str:
    """The same notation as _signatures.FUNCTIONS ("a, axis=, *, copy=")."""
    out, keyword_only = [], False
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            out.append("*" + p.name)
            keyword_only = True
        elif p.kind is p.VAR_KEYWORD:
            out.append("**" + p.name)
        else:
            if p.kind is p.KEYWORD_ONLY and not keyword_only:
                out.append("*")
                keyword_only = True
            out.append(p.name + ("=" if p.default is not p.empty else ""))
    return ", ".join(out)


def test_the_pinned_cupy_is_the_one_installed(real_cupy):
    assert real_cupy.__version__ == _signatures.CUPY_VERSION, (
        f"the stand-in's signatures were taken from CuPy {_signatures.CUPY_VERSION}, but CuPy "
        f"{real_cupy.__version__} is installed: regenerate tests/cupy_standin/_signatures.py")


def test_every_function_exists_in_cupy_with_the_same_signature(real_cupy):
    for name, text in _signatures.FUNCTIONS.items():
        assert hasattr(real_cupy, name), f"cupy.{name} does not exist"
        assert _compact(inspect.signature(getattr(real_cupy, name))) == text, f"cupy.{name}'s signature"


def test_every_ufunc_constant_and_dtype_exists_in_cupy(real_cupy):
    for name, (nin, nout) in _signatures.UFUNCS.items():
        u = getattr(real_cupy, name)
        assert type(u).__name__ == "ufunc" and (u.nin, u.nout) == (nin, nout), name
    for name in _signatures.CONSTANTS + _signatures.DTYPES:
        assert hasattr(real_cupy, name), name
    assert hasattr(real_cupy.add, "at")


def test_the_stand_in_namespace_is_a_subset_of_cupys(real_cupy):
    public = {n for n in dir(cps) if not n.startswith("_")} - {"install", "IS_STANDIN", "run"}
    missing = sorted(n for n in public if not hasattr(real_cupy, n))
    assert not missing, f"the stand-in offers names CuPy lacks: {missing}"


def test_array_attributes_exist_on_cupy_ndarray(real_cupy):
    real = set(dir(real_cupy.ndarray))
    ours = set(_array.DELEGATED_ATTRIBUTES) | {"get", "set", "data", "device"}
    ours |= {n for n in vars(cps.ndarray) if n.startswith("__") and n.endswith("__")} - {
        "__slots__", "__module__", "__dict__", "__weakref__", "__qualname__", "__doc__", "__firstlineno__",
        "__static_attributes__", "__getattr__"}
    assert not sorted(ours - real), f"cupy.ndarray has no {sorted(ours - real)}"


def test_random_cuda_and_memory_pool_match_cupy(real_cupy):
    assert _compact(inspect.signature(real_cupy.random.default_rng)) == "seed="
    for method in ("random", "standard_normal", "integers", "uniform"):
        real = _compact(inspect.signature(getattr(real_cupy.random.Generator, method)))
        ours = _compact(inspect.signature(getattr(cps.random.Generator, method)))
        assert ours == real, method
    for name in ("Device", "Stream", "runtime", "get_current_stream", "is_available"):
        assert hasattr(real_cupy.cuda, name), name
    for name in ("getDeviceCount", "getDevice", "setDevice", "getDeviceProperties", "runtimeGetVersion",
                 "driverGetVersion", "deviceSynchronize"):
        assert hasattr(real_cupy.cuda.runtime, name), name
    for name in ("synchronize", "use", "compute_capability", "mem_info", "id"):
        assert hasattr(real_cupy.cuda.Device, name), name
    pool = real_cupy.get_default_memory_pool()
    for name in ("used_bytes", "total_bytes", "free_bytes", "free_all_blocks", "n_free_blocks",
                 "set_limit", "get_limit"):
        assert hasattr(pool, name), name
    for name in ("ElementwiseKernel", "ReductionKernel"):
        assert hasattr(real_cupy, name)


# ---------------------------------------------------------------------------------------------
# the project uses nothing the stand-in lacks
# ---------------------------------------------------------------------------------------------

def _xp_names_used() -> dict[str, set[str]]:
    """Every `xp.NAME`, `backend.xp.NAME`, `cp.NAME` and `self.cp.NAME` in the project's code."""
    used: dict[str, set[str]] = {}
    for folder in ("minigrad", "gpt2", "chapters"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Attribute):
                    continue
                base = node.value
                base_name = base.id if isinstance(base, ast.Name) else (
                    base.attr if isinstance(base, ast.Attribute) else None)
                if base_name in ("xp", "cp", "cupy"):
                    used.setdefault(node.attr, set()).add(str(path.relative_to(REPO)))
    return used


def test_every_cupy_name_the_project_uses_is_in_the_stand_in():
    used = _xp_names_used()
    assert {"zeros", "asarray", "ElementwiseKernel"} <= set(used)  # the scan does find them
    missing = {name: sorted(where) for name, where in used.items() if not hasattr(cps, name)}
    assert not missing, f"the project uses cupy names the stand-in lacks (add them, checked against CuPy): " \
                        f"{missing}"


# ---------------------------------------------------------------------------------------------
# CuPy's rules
# ---------------------------------------------------------------------------------------------

def _x():
    return cps.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))


def test_no_implicit_conversion_to_the_host():
    x = _x()
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(x)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.array([x, x])
    host = x.get()
    assert isinstance(host, np.ndarray) and host.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert isinstance(cps.asnumpy(x), np.ndarray) and isinstance(mg.to_numpy(x), np.ndarray) is True


def test_mixing_host_arrays_into_device_operations_raises():
    x, h = _x(), np.ones(3, dtype=np.float32)
    for op in (lambda: x + h, lambda: h + x, lambda: x * h, lambda: np.add(x, h), lambda: cps.add(x, h),
               lambda: cps.concatenate([x, h[None]]), lambda: cps.matmul(x, h),
               lambda: cps.where(h > 0, x, 0)):
        with pytest.raises(TypeError, match="Unsupported type"):
            op()
    with pytest.raises(TypeError):
        np.exp(x, out=np.empty((2, 3), np.float32))
    x += 1.0                                   # scalars are fine, in place too
    np.testing.assert_array_equal(x.get(), np.arange(6).reshape(2, 3) + 1)
    x[np.array([0])] = np.zeros(3, np.float32)  # CuPy copies host indices and values over
    assert x.get()[0].tolist() == [0, 0, 0]


def test_results_stay_on_the_device_as_zero_d_arrays():
    x = _x()
    for r in (x.sum(), x[0, 1], cps.max(x), x.mean(axis=None)):
        assert isinstance(r, cps.ndarray) and r.ndim == 0
    assert float(x.sum()) == 15.0 and int(x[1, 2]) == 5 and bool(x.any()) and x.sum().item() == 15.0


def test_only_cupys_keywords_and_attributes():
    x = _x()
    with pytest.raises(TypeError):
        cps.argsort(x, kind="stable", stable=True)   # NumPy's `stable=` is not CuPy's
    with pytest.raises(TypeError):
        cps.zeros((2,), like=x)
    with pytest.raises(AttributeError):
        x.tofile_but_not_in_cupy  # noqa: B018
    with pytest.raises(AttributeError):
        cps.nanquantile  # noqa: B018


def test_views_share_memory_and_ufunc_at_accumulates():
    x = cps.zeros((4,), dtype=np.float32)
    view = x[1:3]
    view += 2.0
    cps.add.at(x, cps.asarray(np.array([0, 0, 3])), 1.0)
    np.testing.assert_array_equal(x.get(), [2, 2, 2, 1])


def test_a_host_device_mix_up_in_project_code_fails(monkeypatch, backend):
    """If an op pulled its input to the host with np.asarray (works on NumPy, breaks on a GPU),
    the CuPy run of the suite must fail."""
    def host_softmax(z, axis=-1, out=None):
        e = np.exp(np.asarray(z) - np.asarray(z).max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)
    monkeypatch.setattr(kernels, "softmax", host_softmax)
    x = Tensor(np.random.default_rng(0).standard_normal((2, 5)), requires_grad=True)
    if backend == "numpy":
        F.softmax(x).sum().backward()          # fine on the CPU ...
    else:
        with pytest.raises(TypeError, match="Implicit conversion"):
            F.softmax(x)                        # ... caught on the CuPy run


# ---------------------------------------------------------------------------------------------
# kernels: CuPy's semantics, compiled from the same source
# ---------------------------------------------------------------------------------------------

def test_elementwise_kernel_broadcasts_casts_scalars_and_writes_in_place():
    k = cps.ElementwiseKernel("T x, T y, int64 n", "T z", "z = x * y + (T)n + (T)(i % 2);", "standin_t1")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((1, 4))
    z = k(cps.asarray(a), cps.asarray(b), 5)
    np.testing.assert_allclose(z.get(), a * b + 5 + (np.arange(12).reshape(3, 4) % 2), rtol=1e-15)
    assert z.dtype == np.float64
    a32 = cps.asarray(a.astype(np.float32))
    out = cps.zeros((4, 3), dtype=np.float32).T           # a non-contiguous output, in place
    k(a32, np.float32(2.0), 0, out)
    np.testing.assert_allclose(out.get(), a.astype(np.float32) * 2 + (np.arange(12).reshape(3, 4) % 2),
                               rtol=1e-6)
    with pytest.raises(TypeError):
        k(a32, cps.asarray(b), 0)                           # T bound to float32 and float64 at once
    with pytest.raises(TypeError, match="Unsupported type"):
        k(a32, b.astype(np.float32), 0)                     # a host array as a kernel argument


def test_reduction_kernel_over_axes_with_keepdims():
    k = cps.ReductionKernel("T x, T w", "T y", "x * w", "a + b", "y = a / (T)2", "0", "standin_t2")
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((3, 4, 5)), rng.standard_normal((1, 1, 5))
    for axis, keepdims in ((-1, True), (1, False), ((0, 2), False), (None, False)):
        got = k(cps.asarray(x), cps.asarray(w), axis=axis, keepdims=keepdims)
        want = (x * w).sum(axis=axis, keepdims=keepdims) / 2
        assert got.shape == want.shape
        np.testing.assert_allclose(got.get(), want, rtol=1e-12)


def test_a_broken_kernel_fails_with_the_compilers_message():
    k = cps.ElementwiseKernel("T x", "T y", "y = x * undeclared_thing;", "standin_broken")
    with pytest.raises(_kernels.CompileError, match="undeclared_thing") as info:
        k(cps.asarray(np.ones(3)))
    assert "error" in str(info.value) and "standin_broken" in str(info.value)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_project_kernel_ran_on_the_stand_in(dtype):
    """Run each fused op once through the cupy backend and check that every kernel `kernels`
    defines was compiled and called (so none is left unexercised by the CuPy half)."""
    mg.set_backend("cupy")
    try:
        kernels._KERNELS = None
        ks = kernels._cupy_kernels()
        x = Tensor(np.random.default_rng(0).standard_normal((2, 3, 8)).astype(dtype), requires_grad=True)
        w = Tensor(np.ones(8, dtype), requires_grad=True)
        b = Tensor(np.zeros(8, dtype), requires_grad=True)
        y = F.gelu(F.layer_norm(x, w, b))
        loss = F.cross_entropy(F.softmax(y).reshape(-1, 8), np.arange(6) % 8)
        loss.backward()
        p = mg.nn.Parameter(np.ones(8, dtype))
        p.grad = mg.backend.asarray(np.ones(8, dtype))
        mg.optim.AdamW([p], lr=1e-3).step()
        defined = {n: k for n, k in vars(ks).items()
                   if isinstance(k, (cps.ElementwiseKernel, cps.ReductionKernel))}
        assert defined and all(k.calls for k in defined.values()), \
            sorted(n for n, k in defined.items() if not k.calls)
    finally:
        kernels._KERNELS = None
        mg.set_backend("numpy")
