"""The CUDA source CuPy would compile for each of our kernels, generated without a GPU.

`tests/test_cuda_compile.py` uses this to compile every kernel the project defines with NVRTC for
real GPU architectures, on a machine that has no GPU. Three steps:

1. **Record.** `RecordingCupy` stands in for the `cp` module that `minigrad.kernels._CupyKernels`
   is built from. Its `ElementwiseKernel` / `ReductionKernel` / `RawKernel` / `RawModule` remember
   their constructor arguments (and where in our code they were called), and every call a wrapper
   makes (which arguments are arrays, of what shape, strides and dtype; which are Python or NumPy
   scalars; which outputs are passed in to be written in place). Everything else in `cp` is NumPy,
   so the wrappers in `minigrad/kernels.py` run unchanged on the CPU.
2. **Generate.** For every recorded call, and for the variants the test adds (float32/float64,
   contiguous, broadcast, non-contiguous, >2 GiB arrays), build real CuPy arrays that point at
   memory that is never touched (`device_array`), and let CuPy's own code generators turn them into
   source. Reductions go through CuPy's real `ReductionKernel._call` (which decides between its
   generic kernel and the CUB one); elementwise kernels go through a transcription of the few lines of
   `ElementwiseKernel.__call__` that come after its device query (`elementwise_arginfos`).
   CuPy's last step, handing source and options to its compiler, is intercepted (`capture_sources`),
   so what is kept is exactly what CuPy would compile: its headers prepended, its options assembled.
3. **Compile.** `compile_cubin` hands that source and those options to CuPy's own NVRTC driver
   (`cupy.cuda.compiler._compile_with_cache_cuda`) for a given architecture, in memory.

What needs a GPU in CuPy is a device query (`cudaGetDevice`), a memory allocation, or loading a
compiled module; each is avoided or intercepted here. These are CuPy internals (underscore names):
they are checked against one pinned CuPy version (`PINNED_CUPY`, the `gpu-check` extra), and if they
move this module raises `CupyInternalsMoved` naming that version, never a silent skip.
"""

from __future__ import annotations

import ast
import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PINNED_CUPY = "14.2.0"  # keep in step with the `gpu-check` extra in pyproject.toml
KERNEL_CLASSES = ("ElementwiseKernel", "ReductionKernel", "RawKernel", "RawModule")
ARCHS = ("80", "90")  # sm_80 (A100), sm_90 (H100)

# CuPy's `_ArgKind` enum (cupy/_core/_kernel.pxd): how an argument appears in the kernel signature.
ARG_KIND_NDARRAY, ARG_KIND_INDEXER, ARG_KIND_SCALAR = 1, 2, 3
INDEX_32_LIMIT = 1 << 31  # CuPy indexes with 32-bit ints while an array spans at most 2 GiB


class CupyInternalsMoved(AssertionError):
    """The CuPy internals this test relies on are not where CuPy PINNED_CUPY keeps them."""


class KernelCompileError(AssertionError):
    """NVRTC rejected a kernel's source; the message carries NVRTC's log."""


# ---------------------------------------------------------------------------------------------
# CuPy's internals, checked once
# ---------------------------------------------------------------------------------------------

@dataclass
class CupyInternals:
    cupy: object
    kernel: object        # cupy._core._kernel
    reduction: object     # cupy._core._reduction
    cub: object           # cupy._core._cub_reduction
    accelerator: object   # cupy._core._accelerator
    scalar: object        # cupy._core._scalar
    carray: object        # cupy._core._carray
    raw: object           # cupy._core.raw
    compiler: object      # cupy.cuda.compiler
    memory: object        # cupy.cuda.memory


_NEEDED = {  # module attribute -> names this module uses from it
    "kernel": ("_ArgInfo", "_TypeMap", "_get_elementwise_kernel", "ElementwiseKernel"),
    "reduction": ("ReductionKernel", "_ReductionKernel_get_cached_function", "_get_axis", "_get_out_shape"),
    "cub": ("_SimpleCubReductionKernel_get_cached_function",),
    "accelerator": ("get_reduction_accelerators", "set_reduction_accelerators"),
    "scalar": ("CScalar",),
    "carray": ("Indexer",),
    "raw": ("_get_raw_module",),
    "compiler": ("_compile_module_with_cache", "_compile_with_cache_cuda",
                 "_get_arch_for_options_for_nvrtc", "function", "CompileException"),
    "memory": ("UnownedMemory", "MemoryPointer"),
}


def load_cupy_internals() -> CupyInternals:
    """Import CuPy and the internals used here; raise CupyInternalsMoved if any has moved."""
    try:
        import cupy
        from cupy._core import _accelerator, _carray, _cub_reduction, _kernel, _reduction, _scalar, raw
        from cupy.cuda import compiler, memory
    except ImportError as exc:
        raise CupyInternalsMoved(_moved_message(f"import failed: {exc}")) from None
    found = CupyInternals(cupy, _kernel, _reduction, _cub_reduction, _accelerator, _scalar, _carray,
                          raw, compiler, memory)
    missing = [f"{getattr(found, mod).__name__}.{name}" for mod, names in _NEEDED.items()
               for name in names if not hasattr(getattr(found, mod), name)]
    # the memoized generators are unwrapped (functools.wraps keeps the original as __wrapped__)
    for owner, name in ((_kernel, "_get_elementwise_kernel"),
                        (_reduction, "_ReductionKernel_get_cached_function"),
                        (_cub_reduction, "_SimpleCubReductionKernel_get_cached_function"),
                        (raw, "_get_raw_module"),
                        (compiler, "_get_arch_for_options_for_nvrtc")):
        if hasattr(owner, name) and not hasattr(getattr(owner, name), "__wrapped__"):
            missing.append(f"{owner.__name__}.{name}.__wrapped__")
    if missing:
        raise CupyInternalsMoved(_moved_message("missing: " + ", ".join(missing)))
    return found


def _moved_message(detail: str) -> str:
    import importlib.metadata as md
    try:
        installed = md.version("cupy-cuda12x")
    except md.PackageNotFoundError:
        installed = "not installed as cupy-cuda12x"
    return (f"the CuPy internals used to generate kernel sources have moved ({detail}); this test is "
            f"written against cupy-cuda12x=={PINNED_CUPY} (installed: {installed}). Install the pinned "
            f'version (pip install -e ".[gpu-check]") or port tests/cuda_sources.py to the new one')


# ---------------------------------------------------------------------------------------------
# Arrays that live nowhere
# ---------------------------------------------------------------------------------------------

_NOWHERE = 0x7F0000000000  # a device address that is never dereferenced: nothing is launched


def device_array(cx: CupyInternals, shape, dtype, strides=None):
    """A real `cupy.ndarray` (real flags, strides, views, broadcasting) over memory it does not
    own and never touches. Strides in bytes; C-contiguous when None."""
    dtype = np.dtype(dtype)
    shape = tuple(int(n) for n in shape)
    if strides is None:
        strides = _c_strides(shape, dtype.itemsize)
    span = dtype.itemsize + sum((n - 1) * abs(s) for n, s in zip(shape, strides))
    mem = cx.memory.UnownedMemory(_NOWHERE, max(span, 1), None, device_id=0)
    return cx.cupy.ndarray(shape, dtype, memptr=cx.memory.MemoryPointer(mem, 0), strides=tuple(strides))


def _c_strides(shape, itemsize):
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


# ---------------------------------------------------------------------------------------------
# Step 1: record definitions and calls
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArraySpec:
    """What a kernel call saw of an array argument (NumPy during recording)."""
    shape: tuple
    strides: tuple  # bytes
    dtype: np.dtype


@dataclass
class KernelCall:
    args: list                       # ArraySpec, or the scalar itself (Python or NumPy scalar)
    kwargs: dict


@dataclass
class KernelDef:
    cls: str                         # one of KERNEL_CLASSES
    args: tuple
    kwargs: dict
    where: tuple                     # (file, line) of the constructor call in our code
    calls: list = field(default_factory=list)

    @property
    def name(self) -> str:
        if self.cls == "RawModule":
            return "RawModule@" + Path(self.where[0]).name + ":" + str(self.where[1])
        names = {"ElementwiseKernel": 3, "ReductionKernel": 6, "RawKernel": 1}
        i = names[self.cls]
        return self.kwargs.get("name", self.args[i] if len(self.args) > i else "kernel")


class _Recorder:
    """Returned by RecordingCupy's kernel constructors: records calls and returns arrays of the
    right shape and dtype (ones, on the CPU) so the wrapper can go on."""

    def __init__(self, cx: CupyInternals, defn: KernelDef, real):
        self.cx, self.defn, self.real = cx, defn, real

    def __call__(self, *args, **kwargs):
        self.defn.calls.append(KernelCall([_spec(a) for a in args], dict(kwargs)))
        if self.defn.cls == "ElementwiseKernel":
            return self._elementwise_result(args)
        if self.defn.cls == "ReductionKernel":
            return self._reduction_result(args, kwargs)
        return None  # raw kernels write into their arguments

    def _elementwise_result(self, args):
        k = self.real
        if len(args) == k.nargs:  # outputs passed in: written in place
            outs = list(args[k.nin:])
        else:
            shape = np.broadcast_shapes(*[np.shape(a) for a, p in zip(args, k.params)
                                          if isinstance(a, np.ndarray) and not p.raw])
            _, out_types, _ = self.cx.kernel._decide_params_type(
                k.in_params, k.out_params, _dtypes(args[:k.nin]), ())
            outs = [np.ones(shape, t) for t in out_types]
        if k.no_return:
            return None
        return outs[0] if (k.nout == 1 and not k.return_tuple) else tuple(outs)

    def _reduction_result(self, args, kwargs):
        k = self.real
        if len(args) == k.nargs or kwargs.get("out") is not None:
            return args[k.nin] if len(args) == k.nargs else kwargs["out"]
        shape = np.broadcast_shapes(*[np.shape(a) for a in args if isinstance(a, np.ndarray)])
        axis = kwargs.get("axis")
        axis = tuple(range(len(shape))) if axis is None else np.atleast_1d(axis)
        reduced = np.ones(shape)
        keepdims = kwargs.get("keepdims", False)
        out_shape = reduced.sum(axis=tuple(int(a) for a in axis), keepdims=keepdims).shape
        _, out_types, _ = self.cx.kernel._decide_params_type(k.in_params, k.out_params,
                                                             _dtypes(args[:k.nin]), ())
        return np.ones(out_shape, out_types[0])


def _dtypes(args):
    return tuple(a.dtype.type if isinstance(a, np.ndarray) else None for a in args)


def _spec(a):
    if isinstance(a, np.ndarray):
        return ArraySpec(a.shape, a.strides, a.dtype)
    return a


class RecordingCupy:
    """A stand-in for the `cupy` module: the four kernel classes record, everything else is NumPy."""

    def __init__(self, cx: CupyInternals):
        self._cx = cx
        self.definitions: list[KernelDef] = []

    def __getattr__(self, name):
        if name in KERNEL_CLASSES:
            return lambda *args, **kwargs: self._define(name, args, kwargs)
        return getattr(np, name)

    def _define(self, cls, args, kwargs):
        caller = sys._getframe(2)  # the frame that wrote `cp.ElementwiseKernel(...)`
        defn = KernelDef(cls, args, kwargs, (str(Path(caller.f_code.co_filename).resolve()), caller.f_lineno))
        self.definitions.append(defn)
        return _Recorder(self._cx, defn, real_kernel(self._cx, defn))


def real_kernel(cx: CupyInternals, defn: KernelDef):
    """The CuPy kernel object itself (building one needs no GPU; calling one does)."""
    return getattr(cx.cupy, defn.cls)(*defn.args, **defn.kwargs)


def kernel_constructor_calls(roots) -> list[tuple[str, int, int]]:
    """(file, first line, last line) of every call to one of KERNEL_CLASSES (`cp.ElementwiseKernel(...)`,
    `ElementwiseKernel(...)`) in the .py files under `roots`, found by parsing, not by matching text.
    (A recorded call's line falls in that range; which line exactly differs between Pythons.)"""
    found = []
    for root in roots:
        for path in sorted(Path(root).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    f = node.func
                    name = getattr(f, "attr", None) or getattr(f, "id", None)
                    if name in KERNEL_CLASSES:
                        found.append((str(path.resolve()), node.lineno, node.end_lineno))
    return found


# ---------------------------------------------------------------------------------------------
# Step 2: the argument kinds, and the source CuPy generates for each
# ---------------------------------------------------------------------------------------------

FLOAT_DTYPES = (np.float32, np.float64)
LAYOUTS = ("as called", "contiguous", "broadcast", "strided", "transposed", "over 2 GiB")


@dataclass(frozen=True)
class Source:
    """One translation unit exactly as CuPy would hand it to NVRTC."""
    kernel: str
    kind: str                 # what it was generated for: "float32, strided, call 2", ...
    code: str
    options: tuple
    compile_kwargs: tuple     # the rest of CuPy's _compile_module_with_cache arguments, as items

    @property
    def key(self):
        return (self.code, self.options, self.compile_kwargs)


class _Captured(Exception):  # noqa: N818 - raised to stop CuPy right before it compiles
    def __init__(self, code, options, kwargs):
        super().__init__("captured")
        self.code, self.options, self.kwargs = code, options, kwargs


@contextlib.contextmanager
def capture_sources(cx: CupyInternals):
    """While active, CuPy's code paths stop right where they would compile, raising _Captured with
    the final source and options. The device-keyed memo wrappers (which ask the driver for the
    current device) are replaced by the functions they wrap."""
    def capture(source, options=(), **kwargs):
        raise _Captured(source, tuple(options), kwargs)

    patches = [(cx.compiler, "_compile_module_with_cache", capture)]
    for owner, name in ((cx.reduction, "_ReductionKernel_get_cached_function"),
                        (cx.cub, "_SimpleCubReductionKernel_get_cached_function")):
        patches.append((owner, name, getattr(owner, name).__wrapped__))
    with _patched(patches):
        yield


@contextlib.contextmanager
def _patched(patches):
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _capture(cx, kernel, kind, generate) -> Source:
    """Run `generate()` (a CuPy code path) inside capture_sources and return what it would compile."""
    with capture_sources(cx):
        try:
            generate()
        except _Captured as got:
            return Source(kernel, kind, got.code, got.options, tuple(sorted(
                (k, v) for k, v in got.kwargs.items() if k != "log_stream")))
        except cx.cupy.cuda.runtime.CUDARuntimeError as exc:
            raise AssertionError(f"{kernel} ({kind}): CuPy asked the GPU for something on the way to "
                                 f"its kernel source ({exc}); tests/cuda_sources.py cannot generate "
                                 "this kind of call without a GPU (known case: a CUB reduction over "
                                 "all axes, which allocates a buffer between its two kernels)") from None
    raise CupyInternalsMoved(_moved_message(f"{kernel} ({kind}) reached no compile call"))


def sources_for(cx: CupyInternals, defn: KernelDef) -> list[Source]:
    """Every source CuPy would compile for one kernel definition: for each recorded call, each
    float dtype and each layout (reductions: with and without CuPy's CUB accelerator)."""
    real = real_kernel(cx, defn)
    if defn.cls in ("RawKernel", "RawModule"):
        return [_raw_source(cx, defn, real)]
    out = []
    for n, call in enumerate(defn.calls, 1):
        for dtype in FLOAT_DTYPES:
            for layout in LAYOUTS:
                args = materialize(cx, real, defn.cls, call, dtype, layout)
                if args is None:
                    continue
                kind = f"{np.dtype(dtype).name}, {layout}, call {n}"
                if defn.cls == "ElementwiseKernel":
                    out.append(_capture(cx, defn.name, kind,
                                        lambda a=args: _elementwise_generate(cx, real, a)))
                    continue
                for cub in (True, False):  # CUPY_ACCELERATORS=cub (CuPy's default) and unset
                    out.append(_capture(cx, defn.name, kind + (", accelerators=cub" if cub else ""),
                                        lambda a=args, c=cub, kw=call.kwargs:
                                        _reduction_generate(cx, real, a, kw, c)))
    return out


def materialize(cx, real, cls, call: KernelCall, dtype, layout):
    """The recorded call's arguments as CuPy arrays of one float dtype and one layout, or None
    where the layout does not apply (nothing to broadcast, no axis to stride, ...)."""
    dtype = np.dtype(dtype)
    nin = real.nin
    params = (real.params if cls == "ElementwiseKernel" else real.in_params + real.out_params)
    specs = call.args
    is_array = [isinstance(s, ArraySpec) and not params[i].raw for i, s in enumerate(specs)]
    loop = [s.shape for i, s in enumerate(specs) if is_array[i] and (cls == "ElementwiseKernel" or i < nin)]
    full = np.broadcast_shapes(*loop) if loop else ()

    def as_dtype(s):
        return dtype if s.dtype.kind == "f" else s.dtype

    def recorded(s, scale=1):  # the recorded shape and strides (in elements); scale grows axis 0
        t = as_dtype(s)
        strides = tuple(st // s.dtype.itemsize * t.itemsize for st in s.strides)
        shape = s.shape
        if scale > 1 and len(shape) == len(full) and shape[0] == full[0]:
            shape = (shape[0] * scale,) + shape[1:]
        return device_array(cx, shape, t, strides)

    def one(i, s):
        if not isinstance(s, ArraySpec):
            return dtype.type(s) if isinstance(s, np.floating) else s
        if not is_array[i] or layout == "as called":
            return recorded(s)
        t = as_dtype(s)
        output = i >= nin
        if layout == "contiguous":
            return device_array(cx, s.shape if output else full, t)
        if layout == "broadcast":
            if output:
                return device_array(cx, s.shape, t)
            one_row = device_array(cx, (1,) + tuple(full[1:]), t)
            return cx.cupy.broadcast_to(one_row, full)
        if layout == "strided":  # every other element along the last axis longer than 1
            axes = [ax for ax, n in enumerate(s.shape) if n > 1]
            if not axes:
                return device_array(cx, s.shape, t)
            ax = axes[-1]
            wide = list(s.shape)
            wide[ax] *= 2
            view = device_array(cx, wide, t)[(slice(None),) * ax + (slice(None, None, 2),)]
            return view
        if layout == "transposed":  # a C-contiguous buffer seen in reverse axis order
            return device_array(cx, s.shape[::-1], t).T
        if layout == "over 2 GiB":  # past 2 GiB CuPy switches to 64-bit indexing
            return recorded(s, scale=_scale_past_2gib(full, dtype))
        raise ValueError(layout)

    if layout == "broadcast" and (not full or full[0] == 1):
        return None
    if layout == "strided" and not any(n > 1 for n in full):
        return None
    if layout == "transposed" and not any(is_array[i] and len(s.shape) > 1 for i, s in enumerate(specs)):
        return None
    return [one(i, s) for i, s in enumerate(specs)]


def _scale_past_2gib(full, dtype):
    nbytes = int(np.prod(full, dtype=np.int64)) * np.dtype(dtype).itemsize
    return INDEX_32_LIMIT // max(nbytes, 1) + 1


def _elementwise_generate(cx, kern, args):
    arginfos, type_map = elementwise_arginfos(cx, kern, args)
    gen = cx.kernel._get_elementwise_kernel.__wrapped__
    gen(arginfos, type_map, kern.params, kern.operation, kern.name, kern.preamble, **kern.kwargs)


def elementwise_arginfos(cx, kern, args):
    """(arginfos, type_map) for `kern(*args)`: a line-by-line transcription of
    `ElementwiseKernel.__call__` in cupy/_core/_kernel.pyx (14.2.0) after its device query, with
    CuPy's own broadcasting, type resolution and scalar casting. The one piece CuPy does not expose
    to Python, `_reduce_dims`, is transcribed below."""
    nd = cx.cupy.ndarray
    params, nin = kern.params, kern.nin
    arg_list = [a if isinstance(a, nd) else cx.scalar.CScalar(a) for a in args]       # _preprocess_args
    arrays = [i for i, a in enumerate(arg_list) if not params[i].raw and isinstance(a, nd)]
    if not arrays:
        raise ValueError("Loop size is undecided.")
    b = cx.cupy.broadcast(*[arg_list[i] for i in arrays])                            # _broadcast
    shape, broadcast = tuple(b.shape), list(arg_list)
    for i, view in zip(arrays, b.values):
        broadcast[i] = view
    in_args, out_args = broadcast[:nin], arg_list[nin:]
    in_types, out_types, type_map = kern._decide_params_type(
        tuple(a.dtype if isinstance(a, nd) else None for a in in_args),
        tuple(a.dtype for a in out_args))
    if not out_args:                                                                 # fresh outputs
        out_args = [device_array(cx, shape, t) for t in out_types]
    elif any(not params[nin + i].raw and tuple(a.shape) != shape for i, a in enumerate(out_args)):
        raise ValueError("Out shape is mismatched")
    for x, t in zip(in_args, in_types):
        if isinstance(x, cx.scalar.CScalar):
            x.apply_dtype(t)
    inout = in_args + out_args
    ndims = [a.ndim if isinstance(a, nd) else 0 for a in inout]
    if kern.reduce_dims:
        shape, ndims = transcribed_reduce_dims(inout, params, shape, ndims)
    infos = []
    for a, n in zip(inout, ndims):
        if isinstance(a, nd):
            infos.append(cx.kernel._ArgInfo(ARG_KIND_NDARRAY, type(a), a.dtype, n, a._c_contiguous,
                                            a._index_32_bits))
        else:
            infos.append(cx.kernel._ArgInfo(ARG_KIND_SCALAR, cx.scalar.CScalar, a.descr, 0, True, True))
    size = int(np.prod(shape, dtype=np.int64))
    infos.append(cx.kernel._ArgInfo(ARG_KIND_INDEXER, cx.carray.Indexer, None, len(shape), True,
                                    size <= INDEX_32_LIMIT))
    return tuple(infos), type_map


def transcribed_reduce_dims(args, params, shape, ndims):
    """CuPy's `_reduce_dims` / `_reduced_view_core` (cdef, cupy/_core/_kernel.pyx 14.2.0): merge
    axes that every non-contiguous array walks with the same stride pattern, so the kernel indexes
    in fewer dimensions. Returns the new loop shape and each argument's new ndim (CuPy's views keep
    the original contiguity flags, so only ndim changes)."""
    nd = type(next(a for a in args if hasattr(a, "strides")))
    if len(shape) <= 1 or not args:
        return shape, ndims
    if len(args) == 1:
        a = args[0]
        if params[0].raw or not isinstance(a, nd):
            return shape, ndims
        v = a.reduced_view()
        return tuple(v.shape), [v.ndim]
    ndim = len(shape)
    arrays, strided = [], []
    for i, a in enumerate(args):
        if params[i].raw or not isinstance(a, nd):
            continue
        arrays.append(i)
        if not a._c_contiguous:
            if ndim == 2:  # CuPy's short cut
                return shape, ndims
            strided.append(i)
    if not arrays:
        return shape, ndims
    new = list(ndims)
    if not strided:  # all C-contiguous: one flat axis
        for i in arrays:
            new[i] = 1
        return (args[arrays[0]].size,), new
    vec, axes, last = list(shape), [], -1
    for ax in range(ndim):
        if vec[ax] == 1:
            continue
        if last < 0:
            last = ax
            continue
        if any(args[i].strides[ax] * vec[ax] != args[i].strides[last] for i in strided):
            axes.append(last)
        else:
            vec[ax] *= vec[last]
        last = ax
    if last >= 0:
        axes.append(last)
    if len(axes) == ndim:
        return shape, ndims
    for i in arrays:
        new[i] = len(axes)
    return tuple(vec[ax] for ax in axes), new


def _reduction_generate(cx, kern, args, kwargs, cub: bool):
    """The start of `ReductionKernel.__call__` (scalars wrapped, inputs broadcast, and the output
    allocated as CuPy would: C-contiguous), then CuPy's own `_call`, which chooses between its CUB
    kernel (one contiguous input, >= 128 elements per output) and its generic one."""
    nd = cx.cupy.ndarray
    nin = kern.nin
    in_args = [a if isinstance(a, nd) else cx.scalar.CScalar(a) for a in args[:nin]]
    out_args = list(args[nin:]) or ([kwargs["out"]] if kwargs.get("out") is not None else [])
    arrays = [i for i, a in enumerate(in_args) if not kern.in_params[i].raw and isinstance(a, nd)]
    b = cx.cupy.broadcast(*[in_args[i] for i in arrays])
    shape = tuple(b.shape)
    for i, view in zip(arrays, b.values):
        in_args[i] = view
    axis, keepdims = kwargs.get("axis"), kwargs.get("keepdims", False)
    if not out_args:
        _, out_types, _ = cx.kernel._decide_params_type(
            kern.in_params, kern.out_params,
            tuple(a.dtype.type if isinstance(a, nd) else None for a in in_args), ())
        reduce_axis, out_axis = cx.reduction._get_axis(axis, len(shape))
        out_shape = cx.reduction._get_out_shape(shape, reduce_axis, out_axis, keepdims)
        out_args = [device_array(cx, out_shape, t) for t in out_types]
    saved = list(cx.accelerator.get_reduction_accelerators())
    cx.accelerator.set_reduction_accelerators(["cub"] if cub else [])
    try:
        kern._call(in_args, out_args, shape, axis, None, keepdims, kern.reduce_dims, 0, None, True, True)
    finally:
        cx.accelerator.set_reduction_accelerators(saved)


def _raw_source(cx, defn, real) -> Source:
    """A RawKernel/RawModule compiles its code as written (no argument kinds): CuPy's own
    `_get_raw_module` up to the compile call."""
    if real.code is None:
        raise AssertionError(f"{defn.name}: a RawModule loaded from a file ({real.file_path}) is "
                             "not compiled by CuPy; nothing to check")
    kw = defn.kwargs
    return _capture(cx, defn.name, "as written", lambda: cx.raw._get_raw_module.__wrapped__(
        real.code, None, real.options, real.backend, kw.get("translate_cucomplex", False),
        real.enable_cooperative_groups, kw.get("jitify", False),
        getattr(real, "name_expressions", None), None))


def unique_sources(sources) -> list[Source]:
    """One Source per distinct (code, options): most argument kinds generate the same code."""
    seen = {}
    for s in sources:
        seen.setdefault(s.key, s)
    return list(seen.values())


# ---------------------------------------------------------------------------------------------
# Step 3: compile with NVRTC, as CuPy would for a given GPU
# ---------------------------------------------------------------------------------------------

class _ModuleCatcher:
    """Takes the place of `cupy.cuda.function.Module` in CuPy's compiler: keeps the cubin that
    CuPy would load onto the GPU."""

    def __init__(self):
        self.cubin = None

    def load(self, cubin):
        self.cubin = bytes(cubin)

    def _set_mapping(self, mapping):
        pass


@contextlib.contextmanager
def nvrtc_without_gpu(cx: CupyInternals):
    """While active, CuPy's compiler runs for an architecture we name instead of asking the GPU."""
    function = cx.compiler.function
    stand_in = type("function", (), {"Module": _ModuleCatcher, "LinkState": function.LinkState})
    with _patched([(cx.compiler, "_get_arch_for_options_for_nvrtc",
                    cx.compiler._get_arch_for_options_for_nvrtc.__wrapped__),
                   (cx.compiler, "function", stand_in)]):
        yield


def compile_cubin(cx: CupyInternals, source: Source, arch: str) -> bytes:
    """NVRTC's cubin for `source` on sm_<arch>, through CuPy's compiler (its -arch, -ftz and the
    rest), in memory. Call inside `nvrtc_without_gpu`. Raises KernelCompileError with NVRTC's log."""
    kw = dict(source.compile_kwargs)
    kw.pop("arch", None)
    try:
        mod = cx.compiler._compile_with_cache_cuda(source.code, source.options, arch,
                                                   cache_in_memory=True, **kw)
    except cx.compiler.CompileException as exc:
        raise KernelCompileError(f"NVRTC could not compile {source.kernel} ({source.kind}) for "
                                 f"sm_{arch}:\n{exc}") from None
    if not isinstance(mod, _ModuleCatcher) or not (mod.cubin or b"").startswith(b"\x7fELF"):
        raise CupyInternalsMoved(_moved_message(f"no cubin came back for sm_{arch}"))
    return mod.cubin


# ---------------------------------------------------------------------------------------------
# A check of the one transcribed piece against CuPy itself
# ---------------------------------------------------------------------------------------------

class _ArgInfos(Exception):  # noqa: N818 - carries the arginfos out of CuPy's reduction code
    def __init__(self, arginfos):
        super().__init__("arginfos")
        self.arginfos = arginfos


def cupy_reduced_ndims(cx: CupyInternals, arrays) -> list[int]:
    """The ndim each array gets from CuPy's own (cdef) `_reduce_dims`, reached through a reduction
    over no axes: `ReductionKernel._call` runs the same `_reduce_dims` on its inputs (with no axis to
    reduce, nothing is permuted) and then builds the kernel's arginfos, which are caught here."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # one type placeholder each: their dtypes may differ
    params = ", ".join(f"{letters[i]} a{i}" for i in range(len(arrays)))
    kern = cx.cupy.ReductionKernel(params, "A r", "a0", "a + b", "r = a", "0", "minigrad_oracle")
    out = device_array(cx, arrays[0].shape, arrays[0].dtype)

    def catch(nin, nout, params, arginfos, *rest):
        raise _ArgInfos(arginfos)

    with _patched([(cx.reduction, "_ReductionKernel_get_cached_function", catch)]):
        try:
            kern._call(list(arrays), [out], tuple(arrays[0].shape), (), None, False, True, 0, None,
                       False, True)
        except _ArgInfos as got:
            return [info.ndim for info in got.arginfos[:len(arrays)]]
    raise CupyInternalsMoved(_moved_message("ReductionKernel._call built no arginfos"))
