"""CuPy's `ElementwiseKernel` and `ReductionKernel`, run on the CPU from *the same kernel source*.

A CuPy kernel is a snippet of CUDA C++ (`y = (T)0.5 * x * ((T)1 + tanh(u));`) plus typed
parameter lists ("T x, T g" in, "T dx" out). CuPy wraps the snippet in a loop over the
broadcast index space, binds each type placeholder (`T`) to the argument's C type, declares
every input as a value read at the current index and every output as a reference written
there, and compiles it. This module does the same with the machine's C++ compiler:

    for (ptrdiff_t i = 0; i < n; ++i) {          // i: flat index into the broadcast shape
        const T x = *(const T*)(arg0 + offset0);   // inputs: values (strides handle broadcasting)
        T& y = *(T*)(arg1 + offset1);              // outputs: references (in-place works)
        <the kernel's operation, verbatim>
    }

so the numbers of every fused kernel can be compared with its NumPy twin on a machine without
a GPU. Reductions loop over the reduced axes for each output element with the kernel's
`map_expr`, `reduce_expr` (`a`, `b`), `post_map_expr` and `identity`, as CuPy defines them.

Compiled libraries are cached by the hash of their source in a per-user temporary folder.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np

from ._array import ndarray

# CuPy's names for C types, by NumPy dtype.
_C_TYPES = {
    np.dtype(np.float16): None,  # CuPy's float16 is a CUDA class: not supported by the stand-in
    np.dtype(np.float32): "float", np.dtype(np.float64): "double",
    np.dtype(np.int8): "signed char", np.dtype(np.int16): "short", np.dtype(np.int32): "int",
    np.dtype(np.int64): "long long", np.dtype(np.uint8): "unsigned char",
    np.dtype(np.uint16): "unsigned short", np.dtype(np.uint32): "unsigned int",
    np.dtype(np.uint64): "unsigned long long", np.dtype(np.bool_): "bool",
}

_PREAMBLE = """\
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <algorithm>
// CUDA device code calls the overloaded math functions unqualified: float in, float out.
using std::tanh; using std::exp; using std::log; using std::sqrt; using std::abs; using std::pow;
using std::min; using std::max; using std::fabs; using std::floor; using std::ceil; using std::log1p;
using std::expm1; using std::erf; using std::sin; using std::cos; using std::isfinite; using std::isnan;
using std::isinf;
static inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
static inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
"""


@dataclass(frozen=True)
class Param:
    ctype: str      # a dtype name ("float32", "int64") or a placeholder ("T")
    name: str
    raw: bool

    @property
    def is_placeholder(self) -> bool:
        return self.ctype not in np.sctypeDict


def parse_params(text: str) -> list[Param]:
    """"T x, raw T y, int64 n" -> [Param("T", "x", False), ...] (CuPy's parameter syntax)."""
    params = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        words = part.split()
        raw = words[0] == "raw"
        if raw:
            words = words[1:]
        if len(words) != 2 or not re.fullmatch(r"[A-Za-z_]\w*", words[1]):
            raise ValueError(f"Invalid parameter: {part!r}")
        params.append(Param(words[0], words[1], raw))
    return params


# --- compiling ---------------------------------------------------------------------------------

def _cache_dir() -> str:
    path = os.path.join(tempfile.gettempdir(), f"minigrad-cupy-standin-{os.getuid()}")
    os.makedirs(path, exist_ok=True)
    return path


_LOADED: dict[str, ctypes.CDLL] = {}


class CompileError(RuntimeError):
    pass


def compile_source(source: str, name: str):
    """Compile C++ `source` into a shared library (cached by its hash); return its `run` function."""
    key = hashlib.sha256(source.encode()).hexdigest()[:20]
    if key not in _LOADED:
        lib_path = os.path.join(_cache_dir(), f"{name}-{key}.so")
        if not os.path.exists(lib_path):
            src_path = lib_path[:-3] + ".cpp"
            with open(src_path, "w") as f:
                f.write(source)
            tmp = f"{lib_path}.{os.getpid()}.tmp"
            proc = subprocess.run(["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-o", tmp, src_path],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise CompileError(f"kernel {name!r} failed to compile:\n{proc.stderr}")
            os.replace(tmp, lib_path)  # atomic: parallel test processes never see half a library
        _LOADED[key] = ctypes.CDLL(lib_path)
    fn = _LOADED[key].run
    fn.restype = None
    return fn


def _typedefs(bindings: dict[str, np.dtype]) -> str:
    return "".join(f"typedef {_c_type(dt)} {name};\n" for name, dt in bindings.items())


def _c_type(dtype) -> str:
    ctype = _C_TYPES.get(np.dtype(dtype))
    if ctype is None:
        raise TypeError(f"the CuPy stand-in does not support dtype {np.dtype(dtype)} in kernels")
    return ctype


# --- argument handling shared by both kinds of kernel ---------------------------------------

def _bind_types(params: list[Param], args: list, bindings: dict) -> None:
    """Bind type placeholders from the dtypes of the array arguments (CuPy's rule: arrays
    decide; a placeholder seen only in scalar arguments takes the scalar's NumPy type)."""
    for p, a in zip(params, args):
        if p.is_placeholder and isinstance(a, ndarray):
            dt = a._a.dtype
            if bindings.setdefault(p.ctype, dt) != dt:
                raise TypeError(f"Type is mismatched. {p.name} {dt} {bindings[p.ctype]}")
    for p, a in zip(params, args):
        if p.is_placeholder and p.ctype not in bindings and a is not None:
            bindings[p.ctype] = np.asarray(a).dtype


def _param_dtype(p: Param, bindings: dict) -> np.dtype:
    return bindings[p.ctype] if p.is_placeholder else np.dtype(p.ctype)


def _as_operand(p: Param, a, dtype) -> np.ndarray:
    """An input argument as a NumPy array of the parameter's type (scalars become 0-d arrays)."""
    if isinstance(a, ndarray):
        arr = a._a
        return arr if arr.dtype == dtype else arr.astype(dtype)
    if isinstance(a, np.ndarray):
        raise TypeError(f"Unsupported type {type(a)}")
    if not isinstance(a, (int, float, bool, complex, np.generic)):
        raise TypeError(f"Unsupported type {type(a)}")
    return np.asarray(a, dtype=dtype)


def _declare(p: Param, index: int, const: bool) -> str:
    ctype = p.ctype if p.is_placeholder else _c_type(np.dtype(p.ctype))
    if const:
        return f"const {ctype} {p.name} = *(const {ctype}*)(args[{index}] + off[{index}]);"
    return f"{ctype}& {p.name} = *({ctype}*)(args[{index}] + off[{index}]);"


def _call(fn, arrays: list[np.ndarray], shape: tuple, n_outer: int, n_inner: int) -> None:
    """Run a compiled kernel over `arrays` (all already broadcast to `shape`)."""
    nargs, ndim = len(arrays), len(shape)
    ptrs = (ctypes.c_void_p * nargs)(*[a.__array_interface__["data"][0] for a in arrays])
    strides = (ctypes.c_ssize_t * max(1, nargs * ndim))(*[s for a in arrays for s in a.strides])
    dims = (ctypes.c_ssize_t * max(1, ndim))(*shape)
    fn(ptrs, strides, dims, ctypes.c_int(ndim), ctypes.c_ssize_t(n_outer), ctypes.c_ssize_t(n_inner))


_LOOP_HEAD = """\
extern "C" void run(char** args, const ptrdiff_t* strides, const ptrdiff_t* shape, int ndim,
                    ptrdiff_t n_outer, ptrdiff_t n_inner) {{
  const int nargs = {nargs};
  for (ptrdiff_t _o = 0; _o < n_outer; ++_o) {{
"""

# Offsets of every argument at flat position `_pos` of the broadcast shape (C order).
_OFFSETS = """\
    ptrdiff_t off[{nargs}];
    {{
      for (int a = 0; a < nargs; ++a) off[a] = 0;
      ptrdiff_t rem = _pos;
      for (int d = ndim - 1; d >= 0; --d) {{
        ptrdiff_t c = rem % shape[d];
        rem /= shape[d];
        for (int a = 0; a < nargs; ++a) off[a] += c * strides[a * ndim + d];
      }}
    }}
"""


class ElementwiseKernel:
    """cupy.ElementwiseKernel(in_params, out_params, operation, name, ...), run on the CPU."""

    def __init__(self, in_params, out_params, operation, name="kernel", reduce_dims=True,
                 preamble="", no_return=False, return_tuple=False, loop_prep="", after_loop="",
                 **kwargs):
        self.in_params = parse_params(in_params)
        self.out_params = parse_params(out_params)
        if any(p.raw for p in self.in_params + self.out_params):
            raise NotImplementedError("the CuPy stand-in does not support raw parameters")
        self.nin, self.nout = len(self.in_params), len(self.out_params)
        self.nargs = self.nin + self.nout
        self.operation, self.name, self.preamble = operation, name, preamble
        self.no_return, self.return_tuple = no_return, return_tuple
        self.loop_prep, self.after_loop = loop_prep, after_loop
        self.calls: list[tuple] = []  # (dtype bindings, argument kinds), for the compile test

    def source(self, bindings: dict) -> str:
        params = self.in_params + self.out_params
        body = "\n".join("    " + _declare(p, k, const=k < self.nin) for k, p in enumerate(params))
        return (_PREAMBLE + _typedefs(bindings) + self.preamble + "\n"
                + _LOOP_HEAD.format(nargs=self.nargs)
                + "    const ptrdiff_t i = _o; const ptrdiff_t _pos = _o; (void)i;\n"
                + _OFFSETS.format(nargs=self.nargs) + body + "\n    {\n" + self.operation
                + "\n    }\n  }\n}\n")

    def __call__(self, *args, size=None, block_size=None, stream=None, **kwargs):
        if kwargs:
            raise TypeError(f"Wrong arguments {kwargs}")
        if len(args) == self.nin:
            ins, outs = list(args), [None] * self.nout
        elif len(args) == self.nargs:
            ins, outs = list(args[:self.nin]), list(args[self.nin:])
        else:
            raise TypeError(f"Wrong number of arguments for {self.name!r}")
        for o in outs:
            if o is not None and not isinstance(o, ndarray):
                raise TypeError(f"Output argument must be cupy.ndarray: {type(o)}")
        bindings: dict = {}
        _bind_types(self.in_params + self.out_params, ins + outs, bindings)
        in_arrays = [_as_operand(p, a, _param_dtype(p, bindings)) for p, a in zip(self.in_params, ins)]
        shape = np.broadcast_shapes(*[a.shape for a in in_arrays],
                                    *[o._a.shape for o in outs if o is not None])
        for o in outs:
            if o is not None and o._a.shape != shape:
                raise ValueError(f"Out shape is mismatched: {o._a.shape} vs {shape}")
        out_arrays = []
        for p, o in zip(self.out_params, outs):
            dt = _param_dtype(p, bindings)
            if o is None:
                o = ndarray(np.empty(shape, dtype=dt))
            elif o._a.dtype != dt:
                raise TypeError(f"Type is mismatched. {p.name} {o._a.dtype} {dt}")
            out_arrays.append(o)
        self.calls.append((dict(bindings), tuple(_kind(a) for a in ins + outs)))
        fn = compile_source(self.source(bindings), self.name)
        arrays = [np.broadcast_to(a, shape) for a in in_arrays] + [o._a for o in out_arrays]
        _call(fn, arrays, shape, int(np.prod(shape)), 1)
        if self.no_return:
            return None
        if self.nout == 1 and not self.return_tuple:
            return out_arrays[0]
        return tuple(out_arrays)


class ReductionKernel:
    """cupy.ReductionKernel(in_params, out_params, map_expr, reduce_expr, post_map_expr,
    identity, name, reduce_type, ...), run on the CPU."""

    def __init__(self, in_params, out_params, map_expr, reduce_expr, post_map_expr, identity,
                 name="reduce_kernel", reduce_type=None, reduce_dims=True, preamble="", options=()):
        self.in_params = parse_params(in_params)
        self.out_params = parse_params(out_params)
        if any(p.raw for p in self.in_params + self.out_params):
            raise NotImplementedError("the CuPy stand-in does not support raw parameters")
        if len(self.out_params) != 1:
            raise NotImplementedError("the CuPy stand-in supports reductions with one output")
        self.nin = len(self.in_params)
        self.map_expr, self.reduce_expr, self.post_map_expr = map_expr, reduce_expr, post_map_expr
        self.identity, self.name, self.reduce_type, self.preamble = identity, name, reduce_type, preamble
        self.calls: list[tuple] = []

    def source(self, bindings: dict) -> str:
        out = self.out_params[0]
        reduce_type = self.reduce_type or out.ctype
        if reduce_type in np.sctypeDict:
            reduce_type = _c_type(np.dtype(reduce_type))
        nargs = self.nin + 1
        inputs = "\n".join("      " + _declare(p, k, const=True) for k, p in enumerate(self.in_params))
        if self.identity is None:
            init = "      bool _first = true; type_reduce _acc{};\n"
            step = ("        if (_first) { _acc = _m; _first = false; } else "
                    f"{{ type_reduce a = _acc, b = _m; _acc = ({self.reduce_expr}); }}\n")
        else:
            init = f"      type_reduce _acc = (type_reduce)({self.identity});\n"
            step = f"        {{ type_reduce a = _acc, b = _m; _acc = ({self.reduce_expr}); }}\n"
        return (_PREAMBLE + _typedefs(bindings) + f"typedef {reduce_type} type_reduce;\n" + self.preamble
                + "\n" + _LOOP_HEAD.format(nargs=nargs)
                + init
                + "    for (ptrdiff_t _r = 0; _r < n_inner; ++_r) {\n"
                + "      const ptrdiff_t _pos = _o * n_inner + _r;\n"
                + _OFFSETS.format(nargs=nargs) + inputs + "\n"
                + f"      type_reduce _m = (type_reduce)({self.map_expr});\n" + step + "    }\n"
                + "    {\n      ptrdiff_t _pos = _o * n_inner;\n" + _OFFSETS.format(nargs=nargs)
                + f"      {_declare(out, self.nin, const=False)}\n"
                + f"      type_reduce a = _acc;\n      {self.post_map_expr};\n    }}\n  }}\n}}\n")

    def __call__(self, *args, out=None, axis=None, keepdims=False, stream=None):
        if len(args) != self.nin:
            raise TypeError(f"Wrong number of arguments for {self.name!r}")
        bindings: dict = {}
        _bind_types(self.in_params + self.out_params, list(args) + [out], bindings)
        in_arrays = [_as_operand(p, a, _param_dtype(p, bindings)) for p, a in zip(self.in_params, args)]
        full = np.broadcast_shapes(*[a.shape for a in in_arrays])
        ndim = len(full)
        axes = tuple(range(ndim)) if axis is None else (axis if isinstance(axis, tuple) else (axis,))
        axes = tuple(sorted(a % ndim for a in axes)) if ndim else ()
        kept = tuple(d for d in range(ndim) if d not in axes)
        order = kept + axes  # reduced axes last: each output element owns a contiguous run of _r
        out_shape = tuple(full[d] for d in kept)
        out_dtype = _param_dtype(self.out_params[0], bindings)
        result = np.empty(out_shape, dtype=out_dtype)
        n_outer = int(np.prod(out_shape))
        n_inner = int(np.prod([full[d] for d in axes]))
        permuted_shape = tuple(full[d] for d in order)
        arrays = [np.broadcast_to(a, full).transpose(order) for a in in_arrays]
        # The output, viewed in the permuted shape with stride 0 over the reduced axes.
        out_view = np.lib.stride_tricks.as_strided(result, permuted_shape, result.strides + (0,) * len(axes))
        self.calls.append((dict(bindings), tuple(_kind(a) for a in args), axes))
        fn = compile_source(self.source(bindings), self.name)
        _call(fn, arrays + [out_view], permuted_shape, n_outer, n_inner)
        if keepdims:
            result = result.reshape(tuple(1 if d in axes else full[d] for d in range(ndim)))
        if out is not None:
            out._a[...] = result
            return out
        return ndarray(result)


def _kind(a) -> tuple:
    """What the compile test needs to know of an argument: array (dtype, shape, strides) or scalar."""
    if isinstance(a, ndarray):
        return ("array", a._a.dtype.name, a._a.shape, a._a.strides)
    if a is None:
        return ("none",)
    return ("scalar", type(a).__name__)
