"""The stand-in's `ndarray`: a NumPy array kept behind a wall, with CuPy's rules at the wall.

A CuPy array lives in GPU memory, so CuPy refuses everything that would silently copy it to the
host or mix it with host arrays. This class holds a NumPy array (`_a`, "device memory") and
enforces the same refusals, so code that passes here does not trip over them on a GPU:

* `numpy.asarray(x)`, `numpy.array(x)` and any implicit conversion raise TypeError (CuPy's
  `__array__` does); `.get()` / `cupy.asnumpy` are the explicit ways out.
* An operator or ufunc that mixes it with a NumPy array raises TypeError; Python and NumPy
  *scalars* are fine, as on CuPy.
* Reductions and scalar indexing return 0-d arrays, never NumPy scalars (CuPy keeps results on
  the device until asked); `float(x)`, `int(x)`, `bool(x)` and `.item()` sync as CuPy does.
* Only attributes that `cupy.ndarray` has exist (the list is checked against the real CuPy).

Views share memory exactly as on NumPy and CuPy: `x[1:]` wraps a NumPy view, so in-place
updates through it reach the base array.
"""

from __future__ import annotations

import numbers
import operator

import numpy as np

# Public attributes of cupy.ndarray (CuPy 14.2) that the stand-in implements by delegating to
# NumPy's array with the same meaning. tests/test_cupy_standin.py checks each one exists on the
# real cupy.ndarray.
DELEGATED_ATTRIBUTES = frozenset("""
    T all any argmax argmin argpartition argsort astype base clip conj conjugate copy cumprod
    cumsum diagonal dot dtype fill flags flatten imag item itemsize max mean min nbytes ndim
    nonzero partition prod ptp put ravel real repeat reshape round searchsorted shape size sort
    squeeze std strides sum swapaxes take tolist trace transpose var view
""".split())

_NOT_ON_DEVICE = ("Implicit conversion to a NumPy array is not allowed. "
                  "Please use `.get()` to construct a NumPy array explicitly.")


def _unsupported(value) -> TypeError:
    return TypeError(f"Unsupported type {type(value)}")


def unwrap(value, allow_host: bool = False):
    """The NumPy array behind a stand-in array, for passing into NumPy.

    Python and NumPy scalars pass through, tuples and lists are unwrapped element by element.
    A NumPy array raises TypeError (CuPy does not mix host arrays into device operations)
    unless `allow_host` (host-to-device copies: asarray, indices, assigned values)."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, np.ndarray):
        if allow_host:
            return value
        raise _unsupported(value)
    if isinstance(value, (list, tuple)):
        return type(value)(unwrap(v, allow_host) for v in value)
    return value


def wrap(value):
    """NumPy results back behind the wall: arrays and NumPy scalars become stand-in arrays."""
    if isinstance(value, np.ndarray):
        return ndarray(value)
    if isinstance(value, np.generic):
        return ndarray(np.asarray(value))
    if isinstance(value, tuple):
        return tuple(wrap(v) for v in value)
    if isinstance(value, list):
        return [wrap(v) for v in value]
    return value


def _operand(value):
    """An operand of an arithmetic operator: stand-in arrays and scalars; anything else refused."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, (numbers.Number, np.generic)):
        return value
    raise _unsupported(value)


class ndarray:  # noqa: N801 - named as in CuPy
    __slots__ = ("_a",)
    __array_priority__ = 100  # NumPy defers binary operators to us (so we can refuse them)

    def __init__(self, a: np.ndarray):
        if not isinstance(a, np.ndarray):
            raise TypeError("stand-in arrays are made by cupy.asarray / cupy.zeros / ..., not directly")
        self._a = a

    # --- the wall ---------------------------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError(_NOT_ON_DEVICE)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        """np.exp(x) on a CuPy array runs CuPy's exp (CuPy implements this protocol); a NumPy
        array among the inputs or outputs raises TypeError, as in CuPy."""
        from . import _api  # noqa: PLC0415 - the module namespace, imported late (cycle)

        mine = getattr(_api, ufunc.__name__, None)
        if not isinstance(mine, _api.ufunc):
            return NotImplemented
        if method == "__call__":
            return mine(*inputs, **kwargs)
        if method == "at":
            return mine.at(*inputs, **kwargs)
        return NotImplemented

    def __array_function__(self, func, types, args, kwargs):
        """np.concatenate([x, y]) dispatches to cupy.concatenate when CuPy has that function."""
        from . import _api  # noqa: PLC0415

        mine = getattr(_api, func.__name__, None)
        if mine is None or not callable(mine):
            return NotImplemented
        return mine(*args, **kwargs)

    def get(self, stream=None, order="C", out=None, blocking=True):
        """Copy to the host: a NumPy array (a copy, never a view of device memory)."""
        host = np.array(self._a, order=order)
        if out is not None:
            out[...] = host
            return out
        return host

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray: {type(arr)}")
        if arr.shape != self._a.shape:
            raise ValueError("Shape mismatch")
        self._a[...] = arr

    # --- attributes CuPy arrays have --------------------------------------------------------
    def __getattr__(self, name):
        if name not in DELEGATED_ATTRIBUTES:
            raise AttributeError(f"'cupy.ndarray' object has no attribute '{name}'")
        attr = getattr(self._a, name)
        if not callable(attr):
            return wrap(attr) if isinstance(attr, np.ndarray) else attr
        if name in ("item", "tolist"):
            return attr

        def method(*args, **kwargs):
            return wrap(attr(*unwrap(args, allow_host=True), **{k: unwrap(v) for k, v in kwargs.items()}))
        return method

    @property
    def data(self):
        """CuPy's MemoryPointer: here the host address of the first element (`.ptr`)."""
        return _MemoryPointer(self._a)

    @property
    def device(self):
        from . import cuda  # noqa: PLC0415

        return cuda.Device(0)

    def __setattr__(self, name, value):
        if name == "_a":
            object.__setattr__(self, name, value)
        elif name == "shape":
            self._a.shape = value
        else:
            raise AttributeError(f"cannot set '{name}' on cupy.ndarray")

    # --- Python protocols -------------------------------------------------------------------
    def __repr__(self):  # CuPy prints like NumPy
        return repr(self._a)

    def __str__(self):
        return str(self._a)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (wrap(row) for row in self._a)

    def __bool__(self):
        return bool(self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __complex__(self):
        return complex(self._a)

    def __copy__(self):
        return ndarray(self._a.copy())

    def __deepcopy__(self, memo):
        return ndarray(self._a.copy())

    def __reduce__(self):
        raise TypeError("pickling device arrays is not supported by the stand-in")

    def __getitem__(self, index):
        # CuPy copies NumPy index arrays to the device: allowed.
        return wrap(self._a[unwrap(index, allow_host=True)])

    def __setitem__(self, index, value):
        self._a[unwrap(index, allow_host=True)] = unwrap(value, allow_host=True)

    __hash__ = None


class _MemoryPointer:
    __slots__ = ("ptr", "_keepalive")

    def __init__(self, a: np.ndarray):
        self._keepalive = a
        self.ptr = a.__array_interface__["data"][0]


def _should_use_rop(x, y) -> bool:
    """CuPy's rule (core.pyx) for deferring a binary operator to the other operand: by its
    `__array_ufunc__ = None`, or else by a higher `__array_priority__` (a minigrad Tensor)."""
    try:
        y_ufunc = y.__array_ufunc__
    except AttributeError:
        return getattr(x, "__array_priority__", 0) < getattr(y, "__array_priority__", 0)
    return y_ufunc is None


def _binary(op, reflected=False):
    def method(self, other):
        if isinstance(other, np.ndarray):
            raise _unsupported(other)
        if not reflected and not isinstance(other, (ndarray, numbers.Number, np.generic)) \
                and _should_use_rop(self, other):
            return NotImplemented
        b = _operand(other)
        return wrap(op(b, self._a) if reflected else op(self._a, b))
    return method


def _inplace(op):
    def method(self, other):
        op(self._a, _operand(other))  # mutates self._a in place
        return self
    return method


for _name, _op in [("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("truediv", operator.truediv), ("floordiv", operator.floordiv), ("mod", operator.mod),
                   ("pow", operator.pow), ("matmul", operator.matmul), ("and", operator.and_),
                   ("or", operator.or_), ("xor", operator.xor), ("lshift", operator.lshift),
                   ("rshift", operator.rshift)]:
    setattr(ndarray, f"__{_name}__", _binary(_op))
    setattr(ndarray, f"__r{_name}__", _binary(_op, reflected=True))
    if _name != "matmul":  # CuPy has no in-place @=
        setattr(ndarray, f"__i{_name}__", _inplace(getattr(operator, f"i{_name}")))
for _name, _op in [("lt", operator.lt), ("le", operator.le), ("gt", operator.gt), ("ge", operator.ge),
                   ("eq", operator.eq), ("ne", operator.ne)]:
    setattr(ndarray, f"__{_name}__", _binary(_op))
for _name, _op in [("neg", operator.neg), ("pos", operator.pos), ("abs", operator.abs),
                   ("invert", operator.invert)]:
    setattr(ndarray, f"__{_name}__", (lambda op: lambda self: wrap(op(self._a)))(_op))
