"""Every CUDA kernel the project defines compiles with NVRTC for real GPUs (sm_80, sm_90), no GPU needed.

The source compiled is the one CuPy itself generates for the argument kinds our wrappers really pass
(and float32/float64, contiguous, broadcast, non-contiguous and >2 GiB variants of them); see
tests/cuda_sources.py for how. This catches what a GPU run would catch first: a kernel that does not
compile (a typo, a type mix-up, a function that does not exist on the device). It cannot catch what
only running shows: launch failures, races, out-of-bounds memory access, GPU rounding.

Needs the `gpu-check` extra (CuPy, NVRTC and the CUDA headers from pip; `dev` includes it). Without
CuPy installed at all the tests skip; if CuPy is there but its internals moved, they fail.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import cuda_sources as cs  # noqa: E402 - the helper beside this file

import gpt2  # noqa: E402
import minigrad  # noqa: E402
from minigrad import backend, kernels  # noqa: E402

# where a kernel definition would live: the packages as imported (the checkout, or site-packages)
SCANNED = [Path(minigrad.__file__).resolve().parent, Path(gpt2.__file__).resolve().parent]

# One call of each public wrapper in minigrad/kernels.py, with GPT-2-like shapes: batch B, sequence
# T, channels C, heads H, vocabulary V. The recording `cp` makes each run on the CPU and remembers
# what reaches the kernels. A new wrapper must be added here (test_every_gpu_wrapper_is_exercised).
B, T, C, H, V = 2, 5, 12, 3, 50


def _rng():
    return np.random.default_rng(0)


def _x(*shape):
    return _rng().standard_normal(shape).astype(np.float32)


WRAPPER_CALLS = {
    "gelu_forward": lambda: kernels.gelu_forward(_x(B, T, 4 * C)),
    "gelu_forward_saving": lambda: kernels.gelu_forward_saving(_x(B, T, 4 * C)),
    "gelu_backward": lambda: kernels.gelu_backward(_x(B, T, 4 * C), _x(B, T, 4 * C)),
    "softmax": lambda: (kernels.softmax(_x(B, H, T, T)),
                        kernels.softmax(_x(T, B, H, T), 0, out=_x(T, B, H, T))),
    "softmax_cross_entropy": lambda: kernels.softmax_cross_entropy(
        _x(B * T, V), np.arange(B * T) % V, np.ones(B * T, np.float32)),
    "cross_entropy_grad_": lambda: kernels.cross_entropy_grad_(
        np.full((B * T, V), 1.0 / V, np.float32), np.arange(B * T) % V, np.full(B * T, 0.1, np.float32)),
    "layer_norm_forward": lambda: (kernels.layer_norm_forward(_x(B, T, C), _x(C), _x(C), 1e-5),
                                   kernels.layer_norm_forward(_x(B, T, C), None, None, 1e-5)),
    "layer_norm_backward": lambda: [
        kernels.layer_norm_backward(_x(B, T, C), _x(B, T, 1), _x(B, T, 1), w, _x(B, T, C), need_dx)
        for w in (_x(C), None) for need_dx in (True, False)],
    "adamw_update_": lambda: kernels.adamw_update_(
        _x(C, 3 * C), _x(C, 3 * C), _x(C, 3 * C), np.abs(_x(C, 3 * C)),
        lr=6e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=3),
}


@pytest.fixture(scope="module")
def cx():
    """CuPy's internals (tests/conftest.py has pointed CuPy's kernel cache at a temporary folder)."""
    if importlib.util.find_spec("cupy") is None:
        pytest.skip('CuPy is not installed; pip install -e ".[gpu-check]" to check the CUDA kernels')
    return cs.load_cupy_internals()


def test_cupy_cache_is_a_temporary_folder(cx):
    cache = Path(os.environ["CUPY_CACHE_DIR"]).resolve()
    assert Path.home() / ".cupy" not in [cache, *cache.parents]
    assert Path(cx.compiler._kernel_cache_backend._cache_dir).resolve() == cache  # what CuPy uses


def record(cx, build, calls=()):
    """Build kernels with `build(cp)` on a recording cp, run `calls`, return the definitions."""
    cp = cs.RecordingCupy(cx)
    built = build(cp)
    for call in calls:
        call(built)
    return cp.definitions


@pytest.fixture(scope="module")
def recorded(cx):
    """Our kernels' definitions, each with the calls the public wrappers made to it."""
    cp = cs.RecordingCupy(cx)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "_KERNELS", kernels._CupyKernels(cp))
        mp.setattr(kernels, "_on_gpu", lambda: True)
        mp.setattr(backend, "xp", cp)  # the wrappers' own array code runs on NumPy
        for run in WRAPPER_CALLS.values():
            run()
    return cp.definitions


def compile_all(cx, sources, archs=cs.ARCHS):
    """{(source key, arch): cubin}, compiling on both cores; the first NVRTC error is raised."""
    jobs = [(s, arch) for s in sources for arch in archs]
    with cs.nvrtc_without_gpu(cx), ThreadPoolExecutor(min(2, os.cpu_count() or 1)) as pool:
        cubins = list(pool.map(lambda job: cs.compile_cubin(cx, *job), jobs))
    return {(s.key, arch): cubin for (s, arch), cubin in zip(jobs, cubins)}


# ---------------------------------------------------------------------------------------------
# Discovery: every kernel is found, every wrapper is run, every kernel is called
# ---------------------------------------------------------------------------------------------

def test_discovery_finds_every_kernel_constructor_in_the_code(recorded):
    in_code = cs.kernel_constructor_calls(SCANNED)
    assert in_code, "the scan found no kernel constructors at all: is the scan broken?"
    missing = [f"{f}:{first}" for f, first, last in in_code
               if not any(f == file and first <= line <= last for file, line in (d.where for d in recorded))]
    assert not missing, (
        f"kernel constructors not reached by this test's discovery: {missing}; build them from "
        "_CupyKernels (minigrad/kernels.py) or extend the `recorded` fixture in tests/test_cuda_compile.py")
    for file, line in (d.where for d in recorded):  # and nothing recorded came from elsewhere
        assert any(f == file and first <= line <= last for f, first, last in in_code), (file, line)


def test_every_gpu_wrapper_is_exercised():
    dispatching = sorted(
        name for name, f in inspect.getmembers(kernels, inspect.isfunction)
        if f.__module__ == kernels.__name__ and not name.startswith("_")
        and "_cupy_kernels()" in inspect.getsource(f))
    assert dispatching, "found no wrapper that dispatches to the CuPy kernels"
    assert sorted(WRAPPER_CALLS) == dispatching, "WRAPPER_CALLS must call each GPU-dispatching wrapper"


def test_every_kernel_is_called_by_some_wrapper(recorded):
    uncalled = [d.name for d in recorded if d.cls in ("ElementwiseKernel", "ReductionKernel") and not d.calls]
    assert not uncalled, (f"kernels never called by the wrappers in WRAPPER_CALLS: {uncalled}; add a "
                          "call that reaches them so the argument kinds they get are known")


def test_recorded_calls_carry_what_the_wrappers_pass(recorded):
    """A few facts about the recording itself: in-place outputs, scalars and broadcast rows."""
    by_name = {d.name: d for d in recorded}
    (adamw,) = by_name["minigrad_adamw"].calls
    assert [type(a).__name__ for a in adamw.args] == ["ArraySpec"] + ["float32"] * 6 + ["ArraySpec"] * 3
    (xent,) = by_name["minigrad_xent_grad"].calls
    assert isinstance(xent.args[2], int) and xent.args[2] == V              # V: a Python int
    assert xent.args[3].shape == (B * T, V)                                 # p: written in place
    assert xent.args[0].shape == (B * T, 1) and xent.args[0].dtype == np.int64
    ln_apply = by_name["minigrad_layer_norm_apply"].calls
    assert {type(c.args[3]).__name__ for c in ln_apply} == {"ArraySpec", "float32"}  # w, or 1 if None
    for sq_dev in by_name["minigrad_sq_dev_sum"].calls:  # the mean broadcast along each row
        assert sq_dev.kwargs == {"axis": -1, "keepdims": True} and sq_dev.args[1].shape == (B, T, 1)


# ---------------------------------------------------------------------------------------------
# The compile itself
# ---------------------------------------------------------------------------------------------

def test_every_kernel_compiles_to_cubins_for_sm80_and_sm90(cx, recorded):
    sources = [s for d in recorded for s in cs.sources_for(cx, d)]
    unique = cs.unique_sources(sources)
    cubins = compile_all(cx, unique)
    assert len(cubins) == len(unique) * len(cs.ARCHS)
    assert all(c.startswith(b"\x7fELF") for c in cubins.values())
    for d in recorded:  # each kernel was compiled in both float types and in several layouts
        mine = [s for s in unique if s.kernel == d.name]
        assert any("double" in s.code for s in mine) and any("float" in s.code for s in mine), d.name
        assert len(mine) >= 4, (d.name, [s.kind for s in mine])
    codes = "".join(s.code for s in unique)
    assert "CArray<float, 1, 0, 1>" in codes          # a non-contiguous array, flattened
    assert "CArray<float, 1, 1, 0>" in codes          # 64-bit indexing past 2 GiB
    assert "const float b1" in codes                  # scalars passed by value (AdamW)
    assert "const long long V" in codes               # a typed Python-int parameter


def test_cub_reduction_variant_is_generated_and_compiles(cx):
    """CuPy (CUPY_ACCELERATORS=cub, its default) reduces with CUB when a reduction has one input,
    is contiguous along the reduced axes and reduces >= 128 elements per output; otherwise it uses
    its generic kernel. Our one ReductionKernel has two inputs (x, mean), so it always gets the
    generic kernel; this checks the CUB path of the harness with a one-input kernel."""
    defs = record(cx, lambda cp: cp.ReductionKernel(
        "T x", "T y", "x * x", "a + b", "y = a", "0", "minigrad_test_sum_sq"),
        [lambda k: k(np.ones((4, 256), np.float32), axis=-1),
         lambda k: k(np.ones((4, 64), np.float32), axis=-1)])
    by_kind = {s.kind: s for s in cs.sources_for(cx, defs[0])}
    long_rows = by_kind["float32, as called, call 1, accelerators=cub"]
    short_rows = by_kind["float32, as called, call 2, accelerators=cub"]
    generic = by_kind["float32, as called, call 1"]
    assert "cub::BlockReduce" in long_rows.code and "--std=c++17" in long_rows.options
    assert "cub::BlockReduce" not in short_rows.code  # under 128 elements: generic kernel
    assert "cub::BlockReduce" not in generic.code     # CUB switched off: generic kernel
    compile_all(cx, [long_rows])  # (the generic kernel's template is compiled in the test above)


def test_raw_kernels_compile(cx):
    code = r'extern "C" __global__ void minigrad_test_raw(float* x, int n) {' \
           r' int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] *= 2.0f; }'
    defs = record(cx, lambda cp: (cp.RawKernel(code, "minigrad_test_raw"),
                                  cp.RawModule(code=code, options=("-DMINIGRAD_TEST=1",))))
    sources = [s for d in defs for s in cs.sources_for(cx, d)]
    assert [s.kernel for s in sources][0] == "minigrad_test_raw" and len(sources) == 2
    assert "-DMINIGRAD_TEST=1" in sources[1].options
    compile_all(cx, sources)


def test_a_broken_kernel_fails_with_nvrtc_s_message(cx):
    defs = record(cx, lambda cp: cp.ElementwiseKernel(
        "T x", "T y", "y = x * undeclared_scale;", "minigrad_test_broken"),
        [lambda k: k(np.ones(8, np.float32))])
    (source, *_) = cs.sources_for(cx, defs[0])
    with pytest.raises(cs.KernelCompileError) as failure:
        compile_all(cx, [source], archs=("80",))
    message = str(failure.value)
    assert message.startswith("NVRTC could not compile minigrad_test_broken (float32, as called, call 1)")
    assert "sm_80" in message
    # NVRTC's own diagnostic, e.g. 'kern.cu(17): error: identifier "undeclared_scale" is undefined'
    assert "error" in message and '"undeclared_scale"' in message


def test_transcribed_reduce_dims_matches_cupy(cx, recorded):
    """The one piece of ElementwiseKernel.__call__ rewritten in Python (`_reduce_dims`) gives every
    argument the same ndim as CuPy's own, for every argument kind the compile test generates."""
    checked = 0
    for d in recorded:
        if d.cls != "ElementwiseKernel":
            continue
        real = cs.real_kernel(cx, d)
        for call in d.calls:
            for layout in cs.LAYOUTS:
                args = cs.materialize(cx, real, d.cls, call, np.float32, layout)
                if args is None:
                    continue
                arrays = [a for a in args if isinstance(a, cx.cupy.ndarray)]
                views = list(cx.cupy.broadcast(*arrays).values)  # as ElementwiseKernel broadcasts
                params = cs.real_kernel(cx, d).params
                mine = cs.transcribed_reduce_dims(views, params[:len(views)], tuple(views[0].shape),
                                       [v.ndim for v in views])[1]
                assert mine == cs.cupy_reduced_ndims(cx, views), (d.name, layout)
                checked += 1
    assert checked >= 20


def test_moved_cupy_internals_fail_loudly_naming_the_pinned_version(cx, monkeypatch):
    monkeypatch.delattr(cx.reduction, "_ReductionKernel_get_cached_function")
    with pytest.raises(cs.CupyInternalsMoved) as moved:
        cs.load_cupy_internals()
    assert "cupy._core._reduction._ReductionKernel_get_cached_function" in str(moved.value)
    assert "cupy-cuda12x==14.2.0" in str(moved.value) and "gpu-check" in str(moved.value)
