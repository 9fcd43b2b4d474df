"""Tensor ops: every backward checked against finite differences (float64), plus graph mechanics."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import minigrad as mg
from minigrad import Tensor, gradcheck

RNG = np.random.default_rng(1234)


def t(*shape, positive=False):
    """A fresh float64 leaf of standard-normal values (or values >= 0.5, if `positive`)."""
    a = RNG.standard_normal(shape)
    if positive:
        a = np.abs(a) + 0.5
    return Tensor(a, requires_grad=True, dtype=np.float64)


def close(a, b, **kw):
    kw.setdefault("rtol", 1e-10)
    kw.setdefault("atol", 1e-12)
    a = a.numpy() if isinstance(a, Tensor) else mg.to_numpy(a)
    b = b.numpy() if isinstance(b, Tensor) else mg.to_numpy(b)
    np.testing.assert_allclose(a, b, **kw)


# ---------------------------------------------------------------------------------------------
# Elementwise arithmetic, with broadcasting
# ---------------------------------------------------------------------------------------------

BROADCAST_SHAPES = [
    ((3, 4), (3, 4)),
    ((3, 4), (4,)),
    ((3, 1), (2, 3, 4)),
    ((2, 1, 4), (3, 1)),
    ((), (2, 3)),
]


@pytest.mark.parametrize("sa, sb", BROADCAST_SHAPES)
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_binary_ops_gradcheck(backend, op, sa, sb):
    fns = {
        "add": lambda a, b: a + b,
        "sub": lambda a, b: a - b,
        "mul": lambda a, b: a * b,
        "div": lambda a, b: a / b,
    }
    a, b = t(*sa), t(*sb, positive=True)
    out = fns[op](a, b)
    assert out.shape == np.broadcast_shapes(sa, sb)
    assert gradcheck(fns[op], a, b)


def test_binary_ops_values(backend):
    a, b = t(2, 3), t(3, positive=True)
    an, bn = a.numpy(), b.numpy()
    close(a + b, an + bn)
    close(a - b, an - bn)
    close(a * b, an * bn)
    close(a / b, an / bn)
    close(-a, -an)
    close(a ** 2, an ** 2)


def test_scalars_on_either_side(backend):
    a = t(2, 3, positive=True)
    fn = lambda a: 2.0 + a - 1.5 + 3 * a * 0.5 - (1.0 - a) / 2.0 + 1.0 / a + 2.0 ** a
    an = a.numpy()
    close(fn(a), 2.0 + an - 1.5 + 3 * an * 0.5 - (1.0 - an) / 2.0 + 1.0 / an + 2.0 ** an)
    assert fn(a).dtype == np.float64  # Python scalars do not change the dtype
    assert gradcheck(fn, a)


def test_array_operand_keeps_tensor_dtype(backend):
    a = Tensor(np.ones(3), dtype=np.float32)
    assert (a * np.ones(3)).dtype == np.float32
    assert (np.ones(3) * a).dtype == np.float32  # __array_priority__ routes to __rmul__


@pytest.mark.parametrize("exponent", [2, 3, 0.5, -1.5, 2.7])
def test_pow_scalar_exponent(backend, exponent):
    a = t(3, 4, positive=True)
    close(a ** exponent, a.numpy() ** exponent)
    assert gradcheck(lambda a: a ** exponent, a)


def test_pow_integer_exponent_negative_base(backend):
    a = t(3, 4)
    assert gradcheck(lambda a: a ** 3, a)


@pytest.mark.parametrize("sa, sb", [((3, 4), (3, 4)), ((3, 1), (2, 3, 4)), ((3, 4), ())])
def test_pow_tensor_exponent(backend, sa, sb):
    a, b = t(*sa, positive=True), t(*sb)
    close(a ** b, a.numpy() ** b.numpy())
    assert gradcheck(lambda a, b: a ** b, a, b)


def test_rpow(backend):
    b = t(2, 3)
    close(3.0 ** b, 3.0 ** b.numpy())
    assert gradcheck(lambda b: 3.0 ** b, b)


def test_neg(backend):
    assert gradcheck(lambda a: -a, t(2, 3))


# ---------------------------------------------------------------------------------------------
# Elementwise functions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, ref, positive", [
    ("exp", np.exp, False),
    ("log", np.log, True),
    ("sqrt", np.sqrt, True),
    ("tanh", np.tanh, False),
    ("relu", lambda x: np.maximum(x, 0), False),
])
def test_unary_ops(backend, name, ref, positive):
    a = t(3, 5, positive=positive)
    if name == "relu":  # keep every input away from the kink at 0
        a = Tensor(np.sign(a.numpy()) * (np.abs(a.numpy()) + 0.1), requires_grad=True, dtype=np.float64)
    close(getattr(a, name)(), ref(a.numpy()))
    assert gradcheck(lambda a: getattr(a, name)(), a)


def test_relu_gradient_is_zero_for_negatives(backend):
    a = Tensor([-2.0, -0.5, 0.5, 2.0], requires_grad=True, dtype=np.float64)
    a.relu().sum().backward()
    close(a.grad, [0.0, 0.0, 1.0, 1.0])


# ---------------------------------------------------------------------------------------------
# Matrix products
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sa, sb", [
    ((3, 4), (4, 5)),               # plain 2-D
    ((2, 3, 4), (2, 4, 5)),         # batched
    ((2, 1, 3, 4), (5, 4, 2)),      # broadcast batch axes on both sides
    ((2, 3, 4), (4, 5)),            # batch against a plain matrix
    ((3, 4), (2, 4, 5)),            # plain matrix against a batch
    ((4,), (4, 5)),                 # 1-D on the left: a row vector
    ((3, 4), (4,)),                 # 1-D on the right: a column vector
    ((4,), (4,)),                   # dot product
    ((4,), (2, 4, 3)),              # 1-D against a batch
    ((2, 3, 4), (4,)),              # batch against 1-D
])
def test_matmul(backend, sa, sb):
    a, b = t(*sa), t(*sb)
    out = a @ b
    expected = a.numpy() @ b.numpy()
    assert out.shape == expected.shape
    close(out, expected)
    assert gradcheck(lambda a, b: a @ b, a, b)


def test_matmul_with_constant_array(backend):
    a = t(3, 4)
    w = mg.backend.asarray(RNG.standard_normal((4, 2)))
    assert gradcheck(lambda a: a @ w, a)
    assert gradcheck(lambda a: w.T @ a.T, a)  # __rmatmul__


# ---------------------------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------------------------

AXES = [None, 0, 1, -1, (0, 2), (0, 1, 2)]


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("op", ["sum", "mean", "max", "var"])
def test_reductions(backend, op, axis, keepdims):
    a = t(2, 3, 4)
    out = getattr(a, op)(axis=axis, keepdims=keepdims)
    expected = getattr(np, op)(a.numpy(), axis=axis, keepdims=keepdims)
    assert out.shape == np.shape(expected)
    close(out, expected)
    assert gradcheck(lambda a: getattr(a, op)(axis=axis, keepdims=keepdims), a)


def test_var_with_correction(backend):
    a = t(3, 5)
    close(a.var(axis=1, correction=1), np.var(a.numpy(), axis=1, ddof=1))
    assert gradcheck(lambda a: a.var(axis=1, correction=1), a)


def test_max_ties_share_the_gradient(backend):
    a = Tensor([[1.0, 3.0, 3.0], [2.0, 0.0, -1.0]], requires_grad=True, dtype=np.float64)
    a.max(axis=1).sum().backward()
    close(a.grad, [[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])


# ---------------------------------------------------------------------------------------------
# Shape ops
# ---------------------------------------------------------------------------------------------

def test_reshape_and_view(backend):
    a = t(2, 3, 4)
    assert a.reshape(6, 4).shape == (6, 4)
    assert a.reshape((4, -1)).shape == (4, 6)
    assert a.view(-1).shape == (24,)
    close(a.reshape(4, 6), a.numpy().reshape(4, 6))
    assert gradcheck(lambda a: a.reshape(4, 6) * mg.backend.asarray(np.arange(24.0).reshape(4, 6)), a)


def test_transpose_permute_T(backend):
    a = t(2, 3, 4)
    close(a.transpose(), np.swapaxes(a.numpy(), -2, -1))
    close(a.transpose(0, 2), np.swapaxes(a.numpy(), 0, 2))
    close(a.permute(1, 2, 0), a.numpy().transpose(1, 2, 0))
    close(a.permute((2, 0, 1)), a.numpy().transpose(2, 0, 1))
    close(a.T, a.numpy().T)
    assert gradcheck(lambda a: a.transpose(0, 1), a)
    assert gradcheck(lambda a: a.permute(2, 0, 1), a)
    assert gradcheck(lambda a: a.T, a)


INDICES = [
    ("int", lambda x: 1),
    ("negative int", lambda x: -1),
    ("slice", lambda x: slice(1, 3)),
    ("step slice", lambda x: (slice(None), slice(None, None, 2))),
    ("ellipsis + None", lambda x: (Ellipsis, None, slice(0, 2))),
    ("int and slice", lambda x: (0, slice(1, None), 1)),
    ("fancy, repeated", lambda x: [0, 2, 0, 0]),
    ("fancy on two axes, repeated", lambda x: ([0, 0, 2], [1, 1, 3])),
    ("slice then fancy", lambda x: (slice(None), [3, 3, 1])),
    ("backend int array", lambda x: mg.backend.asarray(np.array([[1, 1], [0, 2]]))),
    ("boolean mask", lambda x: x.data > 0),
    ("boolean row mask", lambda x: mg.backend.asarray(np.array([True, False, True]))),
]


def host_index(index):
    """The same index with any backend array brought to the host, for indexing the NumPy reference."""
    if isinstance(index, tuple):
        return tuple(host_index(i) for i in index)
    return mg.to_numpy(index) if mg.backend.is_cupy_array(index) or isinstance(index, np.ndarray) else index


@pytest.mark.parametrize("name, make_index", INDICES, ids=[n for n, _ in INDICES])
def test_indexing(backend, name, make_index):
    a = t(3, 4, 2)
    index = make_index(a)
    close(a[index], a.numpy()[host_index(index)])
    assert gradcheck(lambda a: a[index], a)


def test_indexing_with_repeats_sums_gradients(backend):
    a = Tensor(np.zeros(4), requires_grad=True, dtype=np.float64)
    a[[1, 1, 1, 3]].sum().backward()
    close(a.grad, [0.0, 3.0, 0.0, 1.0])


def test_indexing_with_a_tensor_index(backend):
    a = t(5, 2)
    idx = Tensor(np.array([4, 0, 4]))
    close(a[idx], a.numpy()[[4, 0, 4]])
    assert gradcheck(lambda a: a[idx], a)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concat(backend, axis):
    shapes = [(2, 3, 4), (2, 3, 4), (2, 3, 4)]
    shapes = [tuple(n + i if d == axis % 3 else n for d, n in enumerate(s)) for i, s in enumerate(shapes)]
    xs = [t(*s) for s in shapes]
    close(mg.concat(xs, axis=axis), np.concatenate([x.numpy() for x in xs], axis=axis))
    assert gradcheck(lambda *xs: mg.concat(xs, axis=axis), *xs)


def test_concat_with_constant(backend):
    a = t(2, 3)
    c = np.ones((1, 3))
    out = mg.concat([a, c], axis=0)
    assert out.shape == (3, 3)
    assert gradcheck(lambda a: mg.concat([a, c], axis=0), a)


@pytest.mark.parametrize("sections", [3, [1, 4, 1]])
def test_split(backend, sections):
    a = t(2, 6)
    pieces = mg.split(a, sections, axis=1)
    bounds = [2, 4] if sections == 3 else [1, 5]
    for p, e in zip(pieces, np.split(a.numpy(), bounds, axis=1)):
        close(p, e)
    weights = [mg.backend.asarray(RNG.standard_normal(p.shape)) for p in pieces]
    assert gradcheck(lambda a: sum((p * w).sum() for p, w in zip(mg.split(a, sections, axis=1), weights)), a)
    assert gradcheck(lambda a: a.split(sections, axis=1)[1], a)


def test_split_errors(backend):
    a = t(2, 5)
    with pytest.raises(ValueError, match="equal parts"):
        mg.split(a, 2, axis=1)
    with pytest.raises(ValueError, match="add up"):
        mg.split(a, [2, 2], axis=1)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_stack(backend, axis):
    xs = [t(2, 3) for _ in range(3)]
    out = mg.stack(xs, axis=axis)
    close(out, np.stack([x.numpy() for x in xs], axis=axis))
    assert gradcheck(lambda *xs: mg.stack(xs, axis=axis), *xs)


@pytest.mark.parametrize("sc, sa, sb", [
    ((3, 4), (3, 4), (3, 4)),
    ((3, 1), (2, 3, 4), (4,)),
    ((4,), (3, 1), (2, 3, 4)),
])
def test_where(backend, sc, sa, sb):
    cond = mg.backend.asarray(RNG.random(sc) > 0.5)
    a, b = t(*sa), t(*sb)
    out = mg.where(cond, a, b)
    close(out, np.where(mg.to_numpy(cond), a.numpy(), b.numpy()))
    assert gradcheck(lambda a, b: mg.where(cond, a, b), a, b)


def test_where_with_scalar_branch(backend):
    cond = mg.backend.asarray(np.array([True, False, True]))
    a = t(2, 3)
    close(mg.where(cond, 0.0, a), np.where(mg.to_numpy(cond), 0.0, a.numpy()))
    assert gradcheck(lambda a: mg.where(cond, 0.0, a), a)


def test_masked_fill(backend):
    a = t(2, 3, 3)
    mask = mg.backend.asarray(np.triu(np.ones((3, 3), dtype=bool), k=1))  # broadcast over the batch
    out = a.masked_fill(mask, -1e9)
    expected = np.where(np.triu(np.ones((3, 3), dtype=bool), k=1), -1e9, a.numpy())
    close(out, expected)
    # (a moderate fill value for the check: -1e9 in the projected sum would swamp the differences)
    assert gradcheck(lambda a: a.masked_fill(mask, -5.0), a)
    a.grad = None
    out.sum().backward()
    close(a.grad, np.broadcast_to(~np.triu(np.ones((3, 3), dtype=bool), k=1), (2, 3, 3)).astype(float))


def test_comparisons_give_boolean_arrays(backend):
    a = Tensor([1.0, 2.0, 3.0])
    assert mg.to_numpy(a > 2.0).tolist() == [False, False, True]
    assert mg.to_numpy(a >= Tensor([1.0, 3.0, 3.0])).tolist() == [True, False, True]
    assert mg.to_numpy(a < 2.0).tolist() == [True, False, False]
    assert mg.to_numpy(a <= 2.0).tolist() == [True, True, False]


def test_astype_gradient_comes_back_in_the_input_dtype(backend):
    a = Tensor(np.ones(3), requires_grad=True, dtype=np.float32)
    b = a.astype(np.float64)
    assert b.dtype == np.float64
    (b * 2.0).sum().backward()
    assert a.grad.dtype == np.float32
    close(a.grad, [2.0, 2.0, 2.0])


def test_a_composite_expression(backend):
    a, b, c = t(3, 4), t(4, 2), t(2)
    fn = lambda a, b, c: ((a @ b + c).tanh() * (a.sum(axis=1, keepdims=True) / 4)).mean(axis=0)
    assert gradcheck(fn, a, b, c)


# ---------------------------------------------------------------------------------------------
# Graph mechanics
# ---------------------------------------------------------------------------------------------

def test_tensor_used_twice_accumulates(backend):
    a = Tensor([1.0, -2.0, 3.0], requires_grad=True, dtype=np.float64)
    (a * a).sum().backward()
    close(a.grad, [2.0, -4.0, 6.0])
    a.grad = None
    (a + a + a).sum().backward()
    close(a.grad, [3.0, 3.0, 3.0])
    # a diamond: h is used by two branches that meet again
    a.grad = None
    h = a * 2.0
    (h.exp() + h * h).sum().backward()
    an = a.numpy()
    close(a.grad, 2.0 * np.exp(2 * an) + 8.0 * an)


def test_two_backward_passes_accumulate_into_leaves(backend):
    a = Tensor([1.0, 2.0], requires_grad=True, dtype=np.float64)
    (a * 3.0).sum().backward()
    (a * a).sum().backward()
    close(a.grad, [3.0 + 2.0, 3.0 + 4.0])


def test_backward_through_a_very_deep_graph(backend):
    x = Tensor([1.0, 2.0], requires_grad=True, dtype=np.float64)
    y = x
    depth = 5000
    assert depth > sys.getrecursionlimit()
    for _ in range(depth):
        y = y + x
    y.sum().backward()
    close(x.grad, [depth + 1.0, depth + 1.0])
    z = x
    for _ in range(depth):
        z = z * 1.0001
    z.sum().backward()  # accumulates onto the first gradient
    close(x.grad, [depth + 1.0 + 1.0001 ** depth] * 2, rtol=1e-9)


def test_no_grad_builds_no_graph(backend):
    x = Tensor([1.0, 2.0], requires_grad=True)
    assert mg.is_grad_enabled()
    with mg.no_grad():
        assert not mg.is_grad_enabled()
        y = (x * 2.0 + x).exp().sum()
        z = mg.F.gelu(mg.concat([x, x]))
    assert mg.is_grad_enabled()
    for out in (y, z):
        assert out.requires_grad is False
        assert out._parents == ()
        assert out._backward is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()
    # grad mode is restored even if the block raises
    with pytest.raises(KeyError), mg.no_grad():
        raise KeyError("inside no_grad")
    assert mg.is_grad_enabled()


def test_constants_do_not_require_grad(backend):
    a = Tensor([1.0, 2.0])
    b = Tensor([3.0, 4.0], requires_grad=True)
    assert not (a * 2.0).requires_grad
    out = a * b
    assert out.requires_grad
    out.sum().backward()
    assert a.grad is None
    close(b.grad, [1.0, 2.0], rtol=1e-6)


def test_backward_on_non_scalar_needs_a_gradient(backend):
    x = Tensor([1.0, 2.0], requires_grad=True)
    y = x * 2.0
    with pytest.raises(RuntimeError, match="scalar"):
        y.backward()
    y.backward(np.array([1.0, 10.0]))
    close(x.grad, [2.0, 20.0])


def test_intermediate_grads_are_freed_unless_retained(backend):
    x = Tensor([1.0, 2.0, 3.0], requires_grad=True, dtype=np.float64)
    h = x * 2.0
    loss = (h * h).sum()
    loss.backward()
    assert h.grad is None
    assert h._parents == ()  # the graph is freed as it is walked
    close(x.grad, 8.0 * x.numpy())
    close(loss.grad, 1.0)  # the tensor backward() was called on keeps its own gradient

    x.grad = None
    h = (x * 2.0).retain_grad()
    (h * h).sum().backward()
    close(h.grad, 2.0 * h.numpy())
    close(x.grad, 8.0 * x.numpy())


def test_gradcheck_on_non_contiguous_and_aliased_inputs(backend):
    a = RNG.standard_normal((3, 4))
    x = Tensor(a.T, requires_grad=True, dtype=np.float64)  # a transposed view: not C-contiguous
    assert gradcheck(lambda x: x * x, x)
    y, z = Tensor(a, requires_grad=True, dtype=np.float64), Tensor(a, requires_grad=True, dtype=np.float64)
    assert gradcheck(lambda y, z: y * z, y, z)  # two inputs built on one NumPy buffer
    np.testing.assert_array_equal(y.numpy(), a)  # values unchanged afterwards


def test_gradcheck_catches_a_wrong_backward(backend):
    def bad_square(x):
        out = Tensor._make(x.data * x.data, (x,))
        if out.requires_grad:
            out._backward = lambda g: x._accumulate(g * x.data)  # should be 2 x
        return out

    x = t(2, 3)
    with pytest.raises(mg.GradcheckError, match="input 0"):
        gradcheck(bad_square, x)
    with pytest.raises(ValueError, match="float64"):
        gradcheck(lambda x: x * x, Tensor(np.ones(2), requires_grad=True, dtype=np.float32))
    with pytest.raises(ValueError, match="requires_grad"):
        gradcheck(lambda x: x * x, Tensor(np.ones(2), dtype=np.float64))


def test_backward_through_a_freed_graph_raises(backend):
    """A second backward() through shared tensors must not silently lose gradients."""
    x = Tensor([1.0, 2.0], requires_grad=True, dtype=np.float64)
    h = x * 3.0
    first, second = h.sum(), (h * h).sum()
    first.backward()
    close(x.grad, [3.0, 3.0])
    with pytest.raises(RuntimeError, match="freed"):
        second.backward()  # h's graph is gone: it would otherwise act as a leaf, and x get nothing
    with pytest.raises(RuntimeError, match="freed"):
        first.backward()
    # the supported way: one backward() through the sum of the losses
    x.grad = None
    h = x * 3.0
    (h.sum() + (h * h).sum()).backward()
    close(x.grad, 3.0 + 18.0 * x.numpy())


def test_detach_cuts_the_graph(backend):
    x = Tensor([1.0, 2.0], requires_grad=True, dtype=np.float64)
    y = (x * x.detach()).sum()
    y.backward()
    close(x.grad, [1.0, 2.0])


def test_float_inputs_take_the_default_dtype(backend):
    assert Tensor([1.0, 2.0]).dtype == np.float32
    assert Tensor([1, 2]).dtype.kind == "i"
    mg.set_default_dtype(np.float64)
    assert Tensor([1.0, 2.0]).dtype == np.float64
    assert mg.tensor(np.ones(2, dtype=np.float32)).dtype == np.float32  # arrays keep their dtype
    with pytest.raises(ValueError):
        mg.set_default_dtype(np.int32)


def test_unbroadcast(backend):
    g = mg.backend.asarray(np.ones((2, 3, 4)))
    close(mg.unbroadcast(g, (3, 1)), np.full((3, 1), 8.0))
    close(mg.unbroadcast(g, (4,)), np.full((4,), 6.0))
    close(mg.unbroadcast(g, (2, 3, 4)), np.ones((2, 3, 4)))
    close(mg.unbroadcast(g, ()), 24.0)


def test_item_numpy_repr(backend):
    x = Tensor([[2.5]])
    assert x.item() == 2.5
    assert isinstance(x.numpy(), np.ndarray)
    with pytest.raises(ValueError, match="one element"):
        Tensor([1.0, 2.0]).item()
    assert "requires_grad=True" in repr(Tensor([1.0], requires_grad=True))
    assert len(Tensor(np.zeros((3, 2)))) == 3
