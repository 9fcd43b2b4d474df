"""The stand-in's functions: each CuPy function the project may call, bound to CuPy's own
signature and computed by NumPy behind the wall.

Every call is first bound against the real CuPy 14.2.0 signature (`_signatures.py`), so a
keyword that NumPy has and CuPy lacks (`kind="stable"` in `argsort`, `like=`, ...) fails here as
it would on a GPU. Arguments are unwrapped strictly (a NumPy array where CuPy wants a device
array raises TypeError); results come back as stand-in arrays, 0-d for reductions.
"""

from __future__ import annotations

import inspect

import numpy as np

from ._array import ndarray, unwrap, wrap
from ._signatures import CONSTANTS, DTYPES, FUNCTIONS, UFUNCS

_DEFAULT = object()  # stands for "has a default" in the rebuilt signatures


def parse_signature(text: str) -> inspect.Signature:
    """"a, axis=, *, copy=" -> an inspect.Signature (defaults are placeholders)."""
    P = inspect.Parameter
    params, keyword_only = [], False
    for word in filter(None, (w.strip() for w in text.split(","))):
        if word == "*":
            keyword_only = True
        elif word.startswith("**"):
            params.append(P(word[2:], P.VAR_KEYWORD))
        elif word.startswith("*"):
            params.append(P(word[1:], P.VAR_POSITIONAL))
            keyword_only = True
        else:
            name = word.rstrip("=")
            params.append(P(name, P.KEYWORD_ONLY if keyword_only else P.POSITIONAL_OR_KEYWORD,
                            default=_DEFAULT if word.endswith("=") else P.empty))
    return inspect.Signature(params)


# Parameters that CuPy reads on the host (shapes, split points, axes, indices it copies over):
# a NumPy array there is fine. Everywhere else a NumPy array is refused.
_HOST_PARAMS = {
    "split": {"indices_or_sections"}, "reshape": {"newshape"}, "transpose": {"axes"},
    "tile": {"reps"}, "broadcast_to": {"shape"}, "take": {"indices"}, "zeros": {"shape"},
    "ones": {"shape"}, "empty": {"shape"}, "full": {"shape"}, "repeat": {"repeats"},
}


def _function(name: str):
    numpy_fn = getattr(np, name)
    sig = parse_signature(FUNCTIONS[name])
    host_params = _HOST_PARAMS.get(name, set())

    def fn(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)  # TypeError for anything CuPy's signature does not take
        host_ok = {k for k in bound.arguments if k in host_params}
        names = list(bound.arguments)
        args = [unwrap(a, allow_host=names[i] in host_ok if i < len(names) else False)
                for i, a in enumerate(args)]
        return wrap(numpy_fn(*args, **{k: unwrap(v, allow_host=k in host_ok) for k, v in kwargs.items()}))
    fn.__name__ = fn.__qualname__ = name
    fn.__signature__ = sig
    return fn


class ufunc:  # noqa: N801 - as in CuPy
    """CuPy's ufunc: called on device arrays and scalars; `out=` must be a device array."""

    _KEYWORDS = {"out", "dtype", "casting"}

    def __init__(self, name: str, nin: int, nout: int):
        self.name, self.nin, self.nout = name, nin, nout
        self._np = getattr(np, name)
        self.__name__ = name

    def __repr__(self):
        return f"<ufunc '{self.name}'>"

    def _check_inputs(self, inputs):
        for x in inputs:
            if not isinstance(x, (ndarray, int, float, bool, complex, np.generic)):
                raise TypeError(f"Unsupported type {type(x)}")

    def __call__(self, *args, **kwargs):
        extra = set(kwargs) - self._KEYWORDS
        if extra:
            raise TypeError(f"Wrong arguments {sorted(extra)}")
        inputs, outs = args[:self.nin], args[self.nin:]
        if "out" in kwargs:
            out = kwargs.pop("out")
            outs = out if isinstance(out, tuple) else (out,)
        self._check_inputs(inputs)
        for o in outs:
            if o is not None and not isinstance(o, ndarray):
                raise TypeError(f"Output argument must be cupy.ndarray: {type(o)}")
        if outs:
            kwargs["out"] = tuple(unwrap(o) if o is not None else None for o in outs)
        result = self._np(*unwrap(inputs), **kwargs)
        if outs and all(o is not None for o in outs):
            return outs[0] if len(outs) == 1 else tuple(outs)
        return wrap(result)

    def at(self, a, indices, b=None):
        """Unbuffered in-place: a[indices] (op)= b, repeated indices accumulate (scatter-add)."""
        if not isinstance(a, ndarray):
            raise TypeError(f"Unsupported type {type(a)}")
        if b is not None:
            self._check_inputs((b,))
        self._np.at(a._a, unwrap(indices, allow_host=True), unwrap(b))


def matmul(*args, out=None, **kwargs):
    """cupy.matmul is a generalised ufunc: two device arrays, optional device `out`."""
    for key in kwargs:
        if key not in ("axes", "axis", "keepdims", "casting", "dtype", "signature", "order"):
            raise TypeError(f"matmul() got an unexpected keyword argument '{key}'")
    a, b = args
    for x in (a, b):
        if not isinstance(x, ndarray):
            raise TypeError(f"Unsupported type {type(x)}")
    if out is not None:
        if not isinstance(out, ndarray):
            raise TypeError(f"Output argument must be cupy.ndarray: {type(out)}")
        np.matmul(a._a, b._a, out=out._a, **kwargs)
        return out
    return wrap(np.matmul(a._a, b._a, **kwargs))


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    """Device (or host) array -> NumPy array on the host."""
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    host = np.asarray(a, order=order)
    if out is not None:
        out[...] = host
        return out
    return host


def asarray(a, dtype=None, order=None, *, copy=None, blocking=False):
    """Host data -> a device array (always a copy of host memory); a device array passes
    through unless a dtype change or `copy=True` asks for a new one."""
    if isinstance(a, ndarray):
        out = a._a.astype(dtype, copy=bool(copy)) if dtype is not None else (a._a.copy() if copy else a._a)
        return a if out is a._a else ndarray(out)
    host = np.array(unwrap(a, allow_host=True), dtype=dtype, order=order or "K", copy=True)
    return ndarray(host)


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    host = np.array(unwrap(obj, allow_host=True), dtype=dtype, copy=True, order=order, ndmin=ndmin)
    return ndarray(host)


def get_default_memory_pool():
    return _MEMORY_POOL


def get_default_pinned_memory_pool():
    return _PINNED_POOL


class _MemoryPool:
    """CuPy's memory pool, as far as the project uses it: byte counts and freeing cached blocks.
    The stand-in has no pool, so the counts are 0."""

    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_bytes(self):
        return 0

    def free_all_blocks(self, stream=None):
        return None

    def n_free_blocks(self):
        return 0

    def set_limit(self, size=None, fraction=None):
        return None

    def get_limit(self):
        return 0


class _PinnedMemoryPool:
    def free_all_blocks(self):
        return None

    def n_free_blocks(self):
        return 0


_MEMORY_POOL = _MemoryPool()
_PINNED_POOL = _PinnedMemoryPool()

_SPECIAL = {"asarray": asarray, "array": array, "asnumpy": asnumpy}

for _name in FUNCTIONS:
    globals()[_name] = _SPECIAL.get(_name) or _function(_name)
for _name, (_nin, _nout) in UFUNCS.items():
    globals()[_name] = ufunc(_name, _nin, _nout)
for _name in CONSTANTS + DTYPES:
    globals()[_name] = getattr(np, _name)

__all__ = sorted(set(FUNCTIONS) | set(UFUNCS) | set(CONSTANTS) | set(DTYPES)
                 | {"matmul", "ndarray", "ufunc", "get_default_memory_pool",
                    "get_default_pinned_memory_pool"})
