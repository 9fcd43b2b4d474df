"""Tensor: an array plus the recipe for its gradient.

The one pattern every op follows (micrograd's, grown up to arrays):

    out = Tensor._make(<forward array>, parents=(a, b))
    if out.requires_grad:
        def backward(g):                # g = dLoss/d(out), same shape as out
            a._accumulate(<dLoss/da>)   # chain rule: dL/da = dL/dout * dout/da
            b._accumulate(<dLoss/db>)
        out._backward = backward
    return out

`Tensor.backward()` orders the graph topologically (with an explicit stack, so a 1000-layer
graph is no problem) and calls each node's closure in reverse. Gradients *accumulate* (`+=`), so
a tensor used twice gets the sum of both contributions. In `no_grad()` mode no closures are
made and nothing is kept for backward.
"""

from __future__ import annotations

import contextlib

import numpy as np

from . import backend

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Inside this block ops build no graph: generation and evaluation keep no activations."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled() -> bool:
    return _grad_enabled


def unbroadcast(grad, shape):
    """Sum `grad` back down to `shape`, undoing NumPy broadcasting.

    If x of shape (3, 1) was broadcast against (2, 3, 4), every element of x was used 2*4 times,
    so its gradient is the sum over the broadcast axes: the leading axis that was added, and
    every axis where x had size 1.
    """
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad


def _as_array(data, dtype=None):
    xp = backend.xp
    if isinstance(data, Tensor):
        data = data.data
    if backend.is_cupy_array(data) or isinstance(data, np.ndarray):
        arr = backend.asarray(data)
        if dtype is not None and arr.dtype != dtype:
            arr = arr.astype(dtype)
        return arr
    arr = xp.asarray(data)
    if dtype is None and arr.dtype.kind == "f":
        arr = arr.astype(backend.default_dtype)  # Python floats become the default float dtype
    elif dtype is not None:
        arr = arr.astype(dtype)
    return arr


class Tensor:
    __array_priority__ = 1000  # make `ndarray * Tensor` call Tensor.__rmul__

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        self.data = _as_array(data, dtype)
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._parents: tuple[Tensor, ...] = ()
        self._backward = None
        self._retain_grad = False

    # -- construction of op outputs ---------------------------------------------------------
    @classmethod
    def _make(cls, data, parents):
        """An op's output: it needs a gradient if grad mode is on and any parent needs one."""
        out = cls.__new__(cls)
        out.data = data
        out.grad = None
        out._backward = None
        out._retain_grad = False
        out.requires_grad = _grad_enabled and any(p.requires_grad for p in parents)
        out._parents = parents if out.requires_grad else ()
        return out

    def _accumulate(self, g):
        """Add `g` (dLoss/dself) into self.grad. Never mutates `g`: it may be shared."""
        if not self.requires_grad:
            return
        if g.dtype != self.data.dtype:
            g = g.astype(self.data.dtype)
        self.grad = g if self.grad is None else self.grad + g

    # -- basic properties: the array's ------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)

    def __len__(self):
        return len(self.data)

    def numpy(self) -> np.ndarray:
        """The data as a NumPy array on the host (a copy if it lives on the GPU)."""
        return backend.to_numpy(self.data)

    def item(self) -> float:
        if self.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return float(self.numpy().reshape(-1)[0])

    def detach(self) -> Tensor:
        return Tensor(self.data)

    def retain_grad(self) -> Tensor:
        """Keep this intermediate tensor's .grad after backward (leaves always keep theirs)."""
        self._retain_grad = True
        return self

    def __repr__(self):
        flag = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({backend.to_numpy(self.data)!r}{flag})"

    # -- reverse-mode autodiff ---------------------------------------------------------------
    def backward(self, grad=None) -> None:
        """Fill .grad of every leaf tensor that requires grad with dSelf/dLeaf.

        `grad` is dLoss/dself; for a scalar it defaults to 1. The graph is freed as it is walked
        (closures and their saved arrays are released; a later backward() that reaches a freed
        node raises), and intermediate gradients are dropped once used, so one backward pass
        needs memory for one step of activations, not two.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad "
                               "(no input had requires_grad=True, or it was made under no_grad())")
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a scalar, got shape {self.shape}")
            grad = backend.xp.ones_like(self.data)
        else:
            grad = _as_array(grad, self.data.dtype)
        # Topological order by iterative depth-first search: each node after all its parents.
        order, visited, stack = [], set(), [(self, False)]
        while stack:
            node, parents_done = stack.pop()
            if parents_done:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            for p in node._parents:
                if p.requires_grad and id(p) not in visited:
                    stack.append((p, False))
        self.grad = grad if self.grad is None else self.grad + grad
        for node in reversed(order):
            if node._backward is not None and node.grad is not None:
                node._backward(node.grad)
            if node._parents:  # an intermediate result: free its recipe and, usually, its grad
                node._backward, node._parents = _freed_backward, ()
                if not node._retain_grad and node is not self:
                    node.grad = None

    # -- elementwise arithmetic (with broadcasting) -----------------------------------------
    def __add__(self, other):
        other = _lift(other, self)
        out = Tensor._make(self.data + other.data, (self, other))
        if out.requires_grad:
            def backward(g):
                self._accumulate(unbroadcast(g, self.shape))
                other._accumulate(unbroadcast(g, other.shape))
            out._backward = backward
        return out

    def __sub__(self, other):
        other = _lift(other, self)
        out = Tensor._make(self.data - other.data, (self, other))
        if out.requires_grad:
            def backward(g):
                self._accumulate(unbroadcast(g, self.shape))
                other._accumulate(unbroadcast(-g, other.shape))
            out._backward = backward
        return out

    def __mul__(self, other):
        other = _lift(other, self)
        out = Tensor._make(self.data * other.data, (self, other))
        if out.requires_grad:
            def backward(g):  # d(ab)/da = b, d(ab)/db = a
                if self.requires_grad:
                    self._accumulate(unbroadcast(g * other.data, self.shape))
                if other.requires_grad:
                    other._accumulate(unbroadcast(g * self.data, other.shape))
            out._backward = backward
        return out

    def __truediv__(self, other):
        other = _lift(other, self)
        out = Tensor._make(self.data / other.data, (self, other))
        if out.requires_grad:
            def backward(g):  # d(a/b)/da = 1/b, d(a/b)/db = -a/b^2
                if self.requires_grad:
                    self._accumulate(unbroadcast(g / other.data, self.shape))
                if other.requires_grad:
                    other._accumulate(unbroadcast(-g * self.data / (other.data * other.data), other.shape))
            out._backward = backward
        return out

    def __pow__(self, exponent):
        if isinstance(exponent, Tensor):  # a ** b with b a tensor: d/db = a^b * ln a
            b = exponent
            out_data = self.data ** b.data
            out = Tensor._make(out_data, (self, b))
            if out.requires_grad:
                def backward(g):
                    if self.requires_grad:
                        self._accumulate(unbroadcast(g * b.data * self.data ** (b.data - 1), self.shape))
                    if b.requires_grad:
                        b._accumulate(unbroadcast(g * out_data * backend.xp.log(self.data), b.shape))
                out._backward = backward
            return out
        n = exponent
        out = Tensor._make(self.data ** n, (self,))
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(g * n * self.data ** (n - 1))
        return out

    def __neg__(self):
        out = Tensor._make(-self.data, (self,))
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(-g)
        return out

    def __radd__(self, other):
        return self + other

    def __rsub__(self, other):
        return _lift(other, self) - self

    def __rmul__(self, other):
        return self * other

    def __rtruediv__(self, other):
        return _lift(other, self) / self

    def __rpow__(self, other):
        return _lift(other, self) ** self

    # -- comparisons give plain boolean arrays (no gradient flows through them) ---------------
    def __gt__(self, other):
        return self.data > _raw(other)

    def __lt__(self, other):
        return self.data < _raw(other)

    def __ge__(self, other):
        return self.data >= _raw(other)

    def __le__(self, other):
        return self.data <= _raw(other)

    # -- elementwise functions ----------------------------------------------------------------
    def exp(self):
        e = backend.xp.exp(self.data)
        out = Tensor._make(e, (self,))
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(g * e)  # d e^x = e^x
        return out

    def log(self):
        out = Tensor._make(backend.xp.log(self.data), (self,))
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(g / self.data)  # d ln x = 1/x
        return out

    def sqrt(self):
        s = backend.xp.sqrt(self.data)
        out = Tensor._make(s, (self,))
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(g / (2 * s))  # d sqrt(x) = 1 / (2 sqrt(x))
        return out

    def tanh(self):
        t = backend.xp.tanh(self.data)
        out = Tensor._make(t, (self,))
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(g * (1 - t * t))  # d tanh = 1 - tanh^2
        return out

    def relu(self):
        mask = self.data > 0
        out = Tensor._make(self.data * mask, (self,))
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(g * mask)
        return out

    # -- matrix product -----------------------------------------------------------------------
    def __matmul__(self, other):
        other = _lift(other, self)
        out = Tensor._make(self.data @ other.data, (self, other))
        if out.requires_grad:
            def backward(g):
                # C = A @ B  =>  dA = dC @ B^T,  dB = A^T @ dC  (batched over leading axes, then
                # summed back over any batch axes that were broadcast). 1-D operands are treated
                # as a row (left) or column (right) vector, as NumPy does.
                xp = backend.xp
                a, b = self.data, other.data
                a2 = a[None, :] if a.ndim == 1 else a
                b2 = b[:, None] if b.ndim == 1 else b
                g2 = g
                if b.ndim == 1:  # (b first: for 1-D @ 1-D, g is 0-d and becomes (1,) then (1, 1))
                    g2 = xp.expand_dims(g2, -1)
                if a.ndim == 1:
                    g2 = xp.expand_dims(g2, -2)
                if self.requires_grad:
                    ga = g2 @ xp.swapaxes(b2, -1, -2)
                    ga = unbroadcast(ga, a2.shape)
                    self._accumulate(ga.reshape(a.shape))
                if other.requires_grad:
                    gb = xp.swapaxes(a2, -1, -2) @ g2
                    gb = unbroadcast(gb, b2.shape)
                    other._accumulate(gb.reshape(b.shape))
            out._backward = backward
        return out

    def __rmatmul__(self, other):
        return _lift(other, self) @ self

    # -- reductions ----------------------------------------------------------------------------
    def sum(self, axis=None, keepdims=False):
        out = Tensor._make(self.data.sum(axis=axis, keepdims=keepdims), (self,))
        if out.requires_grad:
            def backward(g):  # every summed element gets the same gradient: broadcast g back
                if not keepdims and axis is not None:
                    g = backend.xp.expand_dims(g, _norm_axes(axis, self.ndim))
                self._accumulate(backend.xp.broadcast_to(g, self.shape))
            out._backward = backward
        return out

    def mean(self, axis=None, keepdims=False):
        return self.sum(axis=axis, keepdims=keepdims) * (1.0 / self._count(axis))

    def _count(self, axis) -> int:
        """How many elements a reduction over `axis` (None: all of them) combines into one."""
        if axis is None:
            return self.size
        return int(np.prod([self.shape[a] for a in _norm_axes(axis, self.ndim)]))

    def max(self, axis=None, keepdims=False):
        xp = backend.xp
        m = self.data.max(axis=axis, keepdims=True)
        reduced = m if keepdims else (m.reshape(()) if axis is None else xp.squeeze(m, axis))
        out = Tensor._make(reduced, (self,))
        if out.requires_grad:
            def backward(g):
                # The gradient goes to the maximal element; ties share it equally (as in PyTorch's
                # amax), so the result is still the derivative of a well-defined function.
                mask = self.data == m
                count = mask.sum(axis=axis, keepdims=True)
                gk = g if keepdims else (g.reshape((1,) * self.ndim) if axis is None
                                          else xp.expand_dims(g, _norm_axes(axis, self.ndim)))
                self._accumulate(mask * (gk / count))
            out._backward = backward
        return out

    def var(self, axis=None, keepdims=False, correction=0):
        """Variance, biased by default (correction=0) as layer norm uses it."""
        mu = self.mean(axis=axis, keepdims=True)
        d = self - mu
        return (d * d).sum(axis=axis, keepdims=keepdims) * (1.0 / (self._count(axis) - correction))

    # -- shape ----------------------------------------------------------------------------------
    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        out = Tensor._make(self.data.reshape(shape), (self,))
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(g.reshape(self.shape))
        return out

    view = reshape

    def transpose(self, dim0=-2, dim1=-1):
        """Swap two axes (as torch.transpose): `(B, T, H, D).transpose(1, 2)` gives (B, H, T, D)."""
        perm = list(range(self.ndim))
        i, j = dim0 % self.ndim, dim1 % self.ndim
        perm[i], perm[j] = perm[j], perm[i]
        return self.permute(*perm)

    def permute(self, *axes):
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        out = Tensor._make(self.data.transpose(axes), (self,))
        if out.requires_grad:
            inverse = tuple(np.argsort(axes))
            out._backward = lambda g: self._accumulate(g.transpose(inverse))
        return out

    @property
    def T(self):
        return self.permute(*reversed(range(self.ndim)))

    def __getitem__(self, index):
        index = _raw_index(index)
        out = Tensor._make(self.data[index], (self,))
        if out.requires_grad:
            def backward(g):
                # Scatter the gradient back to where the elements came from. `add.at` sums
                # repeated indices (x[[0, 0]] uses x[0] twice), which plain assignment would not.
                xp = backend.xp
                full = xp.zeros_like(self.data)
                if _is_basic_index(index):
                    full[index] += g
                else:
                    xp.add.at(full, index, g)
                self._accumulate(full)
            out._backward = backward
        return out

    def masked_fill(self, mask, value):
        """Elements where `mask` is True become `value` (and get no gradient)."""
        return where(mask, value, self)

    def split(self, sizes_or_sections, axis=-1):
        return split(self, sizes_or_sections, axis)

    def unbind(self, axis=0):
        return unbind(self, axis)

    # -- convenience ---------------------------------------------------------------------------
    def astype(self, dtype) -> Tensor:
        out = Tensor._make(self.data.astype(dtype), (self,))
        if out.requires_grad:
            out._backward = lambda g: self._accumulate(g.astype(self.data.dtype))
        return out

    def zero_grad(self):
        self.grad = None

    def requires_grad_(self, requires_grad: bool = True) -> Tensor:
        """Freeze (False) or unfreeze (True) this tensor in place; returns it.

        A frozen tensor is a constant to autograd: `_accumulate` stores no gradient for it, an op
        whose inputs are all frozen builds no graph node (`_make` sees no parent that needs one),
        and the fused ops skip computing its gradient (they check `requires_grad` before each
        term). Only leaves can be frozen: an op's output needs a gradient iff a parent does.
        """
        if self._parents:
            raise RuntimeError("requires_grad_() on a tensor computed by an op; freeze the leaves "
                               "it came from instead (or use .detach())")
        self.requires_grad = bool(requires_grad)
        if not requires_grad:
            self.grad = None
        return self


# ---------------------------------------------------------------------------------------------
# Functions on several tensors
# ---------------------------------------------------------------------------------------------

def concat(tensors, axis=0):
    """Join tensors along `axis`; the gradient is split back into the pieces."""
    tensors = [t if isinstance(t, Tensor) else Tensor(t) for t in tensors]
    out = Tensor._make(backend.xp.concatenate([t.data for t in tensors], axis=axis), tuple(tensors))
    if out.requires_grad:
        bounds = np.cumsum([t.shape[axis] for t in tensors])[:-1]

        def backward(g):
            for t, piece in zip(tensors, backend.xp.split(g, bounds, axis=axis)):
                t._accumulate(piece)
        out._backward = backward
    return out


def stack(tensors, axis=0):
    return concat([t.reshape(_insert(t.shape, axis, 1)) if isinstance(t, Tensor)
                   else Tensor(backend.xp.expand_dims(_as_array(t), axis)) for t in tensors], axis=axis)


def split(t, sizes_or_sections, axis=-1):
    """Split into pieces: an int gives that many equal pieces, a list gives the sizes."""
    n = t.shape[axis]
    if isinstance(sizes_or_sections, int):
        if n % sizes_or_sections:
            raise ValueError(f"cannot split axis of size {n} into {sizes_or_sections} equal parts")
        sizes = [n // sizes_or_sections] * sizes_or_sections
    else:
        sizes = list(sizes_or_sections)
        if sum(sizes) != n:
            raise ValueError(f"split sizes {sizes} do not add up to the axis size {n}")
    starts = np.cumsum([0] + sizes)
    axis = axis % t.ndim
    return _pieces(t, [(slice(None),) * axis + (slice(int(lo), int(hi)),)
                       for lo, hi in zip(starts[:-1], starts[1:])])


def unbind(t, axis=0):
    """The slices of `t` along `axis`, each without that axis: (3, B, T) -> three (B, T).

    Used to take q, k and v apart after one fused projection. As with `split`, the pieces'
    backward fills one gradient buffer for `t`, instead of one full-size zero array per piece.
    """
    axis = axis % t.ndim
    return _pieces(t, [(slice(None),) * axis + (i,) for i in range(t.shape[axis])])


def _pieces(t, indexes):
    """`t[index]` for non-overlapping basic indexes, sharing one gradient buffer for `t`.

    Every piece's backward runs before `t`'s own (t is their parent), so the first piece to get a
    gradient hands `t` a zero buffer holding its part, and later pieces write their parts into
    that same buffer in place. (If something else replaced t.grad in between, e.g. t is also used
    elsewhere, the buffer is no longer t's alone: that piece starts a new one. Still correct.)
    """
    shared = {"buf": None}

    def backward_for(index):
        def backward(g):
            buf = shared["buf"]
            if buf is not None and t.grad is buf:
                buf[index] = g  # the pieces do not overlap: this part of the buffer is still 0
                return
            buf = backend.xp.zeros_like(t.data)
            buf[index] = g
            t._accumulate(buf)
            shared["buf"] = buf
        return backward

    pieces = []
    for index in indexes:
        out = Tensor._make(t.data[index], (t,))
        if out.requires_grad:
            out._backward = backward_for(index)
        pieces.append(out)
    return pieces


def where(condition, a, b):
    """Elementwise `a if condition else b`; each branch gets the gradient where it was chosen."""
    cond = _raw(condition)
    if isinstance(cond, Tensor):
        cond = cond.data
    ref = a if isinstance(a, Tensor) else b
    a, b = _lift(a, ref), _lift(b, ref)
    out = Tensor._make(backend.xp.where(cond, a.data, b.data), (a, b))
    if out.requires_grad:
        def backward(g):
            zero = backend.xp.zeros((), dtype=g.dtype)
            if a.requires_grad:
                a._accumulate(unbroadcast(backend.xp.where(cond, g, zero), a.shape))
            if b.requires_grad:
                b._accumulate(unbroadcast(backend.xp.where(cond, zero, g), b.shape))
        out._backward = backward
    return out


def _freed_backward(g):
    """Stands in for the backward closure of a node whose graph a backward() pass already freed.

    Without it, a second backward() reaching that node would treat it as a leaf and silently
    drop every gradient behind it.
    """
    raise RuntimeError("backward() reached a tensor whose graph was freed by an earlier backward(); "
                       "to backpropagate several losses through shared tensors, add them and call "
                       "backward() once")


def tensor(data, requires_grad=False, dtype=None) -> Tensor:
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _lift(x, like: Tensor) -> Tensor:
    """Scalars and arrays become constant tensors of `like`'s dtype (so 0.5 * float64 stays f64)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (int, float, bool)):
        return Tensor(backend.xp.asarray(x, dtype=like.dtype))
    return Tensor(x, dtype=like.dtype if _as_array(x).dtype.kind == "f" else None)


def _raw(x):
    return x.data if isinstance(x, Tensor) else x


def _raw_index(index):
    if isinstance(index, tuple):
        return tuple(_raw(i) for i in index)
    return _raw(index)


def _is_basic_index(index) -> bool:
    """Slices, ints, None and Ellipsis never repeat an element, so `+=` is safe and fast."""
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (slice, int, type(None), type(Ellipsis))) for i in items)


def _norm_axes(axis, ndim):
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    return tuple(sorted(a % ndim for a in axes))


def _insert(shape, axis, n):
    shape = list(shape)
    axis = axis % (len(shape) + 1)
    shape.insert(axis, n)
    return tuple(shape)
