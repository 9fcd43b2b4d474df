# %% [markdown]
# # Chapter 1: Automatic differentiation, from one number to tensors
#
# Training a neural network means nudging every weight a little in the direction that lowers
# the loss. To know *which* direction, we need the derivative of the loss with respect to every
# weight: for GPT-2 small, 124 million derivatives, at every step. Nobody writes those by hand.
# An **autograd engine** computes them for us, by recording how each number was made and then
# applying the chain rule backwards through that record.
#
# In this chapter we build the idea up from nothing:
#
# 1. the derivative of a function of one number, by hand and by finite differences;
# 2. the chain rule, and a reverse pass written out by hand;
# 3. a tiny scalar autograd engine (the `Value` of micrograd), in 40 lines;
# 4. `minigrad`, the engine this project uses: the same idea on whole arrays, with broadcasting
#    and matrix products;
# 5. a backward pass derived by hand (softmax) next to the one autograd derives by itself;
# 6. `gradcheck`, which catches a wrong backward;
# 7. a small network learning with AdamW.
#
# Run it top to bottom with `python chapters/01_autograd.py`, or cell by cell in an editor that
# understands `# %%` cells (VS Code, PyCharm, Jupytext). Every cell prints or asserts something
# you can check.

# %%
import math

import numpy as np

import minigrad as mg
from minigrad import F, Tensor, nn, optim

# minigrad computes on NumPy unless MINIGRAD_BACKEND=cupy says CuPy (a GPU). The arrays in this
# chapter are tiny, so the CPU is the natural place; the chapter runs the same on either, and
# `Tensor.numpy()` brings a result back to the host wherever it lives.
mg.manual_seed(0)
np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. The derivative of a function of one number
#
# Take $f(x) = 3x^2 - 4x + 5$. Its derivative, by the rules from school, is $f'(x) = 6x - 4$,
# so at $x = 3$ the slope is $14$: nudge $x$ up by a tiny $h$ and $f$ goes up by about $14h$.
#
# We can also *measure* the slope, without knowing any rules, by evaluating $f$ on both sides
# of $x$. This is the **central finite difference**
# $$f'(x) \approx \frac{f(x + h) - f(x - h)}{2h},$$
# whose error shrinks like $h^2$. It is slow (two evaluations of $f$ per input) but needs no
# thinking, which makes it the perfect referee for derivatives computed any other way.

# %%
def f(x):
    return 3 * x**2 - 4 * x + 5


def df_by_hand(x):
    return 6 * x - 4


x = 3.0
for h in (1e-1, 1e-3, 1e-5):
    numeric = (f(x + h) - f(x - h)) / (2 * h)
    print(f"h = {h:.0e}: finite difference = {numeric:.10f}   by hand = {df_by_hand(x)}")
assert abs((f(x + 1e-5) - f(x - 1e-5)) / 2e-5 - df_by_hand(x)) < 1e-6

# %% [markdown]
# With several inputs, each input has its own derivative (a *partial* derivative): how much the
# output moves when only that input is nudged. For $d = a b + c$:
# $\partial d/\partial a = b$, $\partial d/\partial b = a$, $\partial d/\partial c = 1$.

# %%
def d_of(a, b, c):
    return a * b + c


a, b, c, h = 2.0, -3.0, 10.0, 1e-6
partials_numeric = [
    (d_of(a + h, b, c) - d_of(a - h, b, c)) / (2 * h),
    (d_of(a, b + h, c) - d_of(a, b - h, c)) / (2 * h),
    (d_of(a, b, c + h) - d_of(a, b, c - h)) / (2 * h),
]
partials_by_hand = [b, a, 1.0]
print("numeric :", np.round(partials_numeric, 6))
print("by hand :", partials_by_hand)
assert np.allclose(partials_numeric, partials_by_hand, atol=1e-6)

# %% [markdown]
# ## 2. The chain rule, and a reverse pass by hand
#
# Real models are long chains of simple steps. Take one artificial neuron,
# $$n = w x + b, \qquad y = \tanh(n), \qquad L = (y - t)^2 .$$
# The chain rule says that derivatives along a chain multiply:
# $$\frac{\partial L}{\partial w} = \frac{\partial L}{\partial y}\,\frac{\partial y}{\partial n}\,
#   \frac{\partial n}{\partial w} = 2(y - t)\,\bigl(1 - \tanh^2 n\bigr)\,x .$$
# Notice the order in which it is cheapest to compute this: start at the loss, where
# $\partial L/\partial L = 1$, and walk *backwards*, multiplying in one local derivative per
# step. Every intermediate gradient ($\partial L/\partial y$, then $\partial L/\partial n$) is
# reused for all the inputs of that step. That is **reverse-mode** differentiation, or
# backpropagation: one backward walk gives the derivative with respect to *every* input.

# %%
w, x, b, target = 0.7, 1.5, -0.2, 0.5

# forward pass: keep every intermediate value, the backward pass needs them
n = w * x + b
y = math.tanh(n)
L = (y - target) ** 2

# backward pass: one local derivative per step, from the loss back to the inputs
dL_dL = 1.0
dL_dy = dL_dL * 2 * (y - target)       # d(u^2)/du = 2u
dL_dn = dL_dy * (1 - y**2)             # d tanh(n)/dn = 1 - tanh(n)^2
dL_dw = dL_dn * x                      # d(wx + b)/dw = x
dL_dx = dL_dn * w                      # d(wx + b)/dx = w
dL_db = dL_dn * 1.0                    # d(wx + b)/db = 1
print(f"L = {L:.6f}   dL/dw = {dL_dw:.6f}   dL/dx = {dL_dx:.6f}   dL/db = {dL_db:.6f}")


def loss_of(w, x, b):
    return (math.tanh(w * x + b) - target) ** 2


h = 1e-6
assert abs((loss_of(w + h, x, b) - loss_of(w - h, x, b)) / (2 * h) - dL_dw) < 1e-8
assert abs((loss_of(w, x + h, b) - loss_of(w, x - h, b)) / (2 * h) - dL_dx) < 1e-8
assert abs((loss_of(w, x, b + h) - loss_of(w, x, b - h)) / (2 * h) - dL_db) < 1e-8
print("the hand-written reverse pass agrees with finite differences")

# %% [markdown]
# ## 3. Automating it: a scalar autograd engine
#
# The reverse pass above is mechanical, so let the computer do it. Each number becomes a
# `Value` that remembers the values it was made from (its *parents*) and a small closure,
# `_backward`, that applies the local derivative: it takes the gradient of the output and adds
# its share into each parent's `.grad`. (It **adds**, because a value used twice receives a
# gradient from each use.)
#
# `backward()` then visits the values in reverse topological order, so each closure runs only
# after its output's gradient is complete. This is Andrej Karpathy's micrograd, trimmed down.

# %%
class Value:
    def __init__(self, data, parents=()):
        self.data, self.grad = data, 0.0
        self._parents, self._backward = parents, lambda: None

    def __add__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        out = Value(self.data + other.data, (self, other))

        def _backward():
            self.grad += out.grad             # d(a + b)/da = 1
            other.grad += out.grad            # d(a + b)/db = 1
        out._backward = _backward
        return out

    def __mul__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        out = Value(self.data * other.data, (self, other))

        def _backward():
            self.grad += other.data * out.grad  # d(ab)/da = b
            other.grad += self.data * out.grad  # d(ab)/db = a
        out._backward = _backward
        return out

    def __sub__(self, other):
        return self + (other * -1.0)

    def __pow__(self, k):
        out = Value(self.data**k, (self,))

        def _backward():
            self.grad += k * self.data ** (k - 1) * out.grad
        out._backward = _backward
        return out

    def tanh(self):
        t = math.tanh(self.data)
        out = Value(t, (self,))

        def _backward():
            self.grad += (1 - t * t) * out.grad
        out._backward = _backward
        return out

    def backward(self):
        order, seen = [], set()

        def visit(v):  # depth-first: every value after all of its parents
            if id(v) not in seen:
                seen.add(id(v))
                for p in v._parents:
                    visit(p)
                order.append(v)
        visit(self)
        self.grad = 1.0
        for v in reversed(order):
            v._backward()


vw, vx, vb = Value(w), Value(x), Value(b)
vL = ((vw * vx + vb).tanh() - target) ** 2
vL.backward()
print(f"Value engine: L = {vL.data:.6f}   dL/dw = {vw.grad:.6f}   dL/dx = {vx.grad:.6f}   "
      f"dL/db = {vb.grad:.6f}")
assert abs(vw.grad - dL_dw) < 1e-12 and abs(vx.grad - dL_dx) < 1e-12 and abs(vb.grad - dL_db) < 1e-12

# a value used twice: d(a*a)/da = 2a, which needs the += in the closures
va = Value(3.0)
(va * va).backward()
print("d(a*a)/da at a=3:", va.grad)
assert va.grad == 6.0

# %% [markdown]
# ## 4. minigrad: the same idea on arrays
#
# One `Value` per number would be hopelessly slow for a network with millions of weights.
# `minigrad.Tensor` applies exactly the same pattern to whole NumPy (or CuPy) arrays: each op
# computes its output array, and records a closure that turns the output's gradient array into
# gradients for its inputs. Here is our neuron again, now as tensors. The answers are the same.

# %%
tw = Tensor(w, requires_grad=True, dtype=np.float64)
tx = Tensor(x, requires_grad=True, dtype=np.float64)
tb = Tensor(b, requires_grad=True, dtype=np.float64)
tL = ((tw * tx + tb).tanh() - target) ** 2
tL.backward()
print(f"minigrad:     L = {tL.item():.6f}   dL/dw = {tw.grad.item():.6f}   dL/dx = {tx.grad.item():.6f}   "
      f"dL/db = {tb.grad.item():.6f}")
assert np.allclose([tw.grad.item(), tx.grad.item(), tb.grad.item()], [dL_dw, dL_dx, dL_db], rtol=1e-12)

# %% [markdown]
# ### Broadcasting
#
# NumPy lets a `(3, 1)` array combine with a `(4,)` array into a `(3, 4)` result, by
# *broadcasting*: repeating each along the axes where it has size 1 (or is missing). In the
# backward pass, an element that was repeated $k$ times contributed to $k$ outputs, so its
# gradient is the **sum** of those $k$ output gradients. `minigrad.unbroadcast` does that sum;
# every elementwise op calls it.

# %%
col = Tensor(np.arange(3.0).reshape(3, 1), requires_grad=True, dtype=np.float64)  # (3, 1)
row = Tensor(np.arange(4.0), requires_grad=True, dtype=np.float64)                # (4,)
grid = col * 10 + row                                                             # (3, 4)
print("col * 10 + row =\n", grid.numpy())
grid.sum().backward()
print("d sum / d col =", col.grad.ravel(), " (each element of col was used 4 times, times 10)")
print("d sum / d row =", row.grad, "      (each element of row was used 3 times)")
# (gradients live where the tensors do, on the GPU under CuPy: mg.to_numpy brings them to the host)
assert np.array_equal(mg.to_numpy(col.grad), np.full((3, 1), 40.0))
assert np.array_equal(mg.to_numpy(row.grad), np.full(4, 3.0))

# %% [markdown]
# ### Matrix products
#
# For $C = A B$ with gradient $G = \partial L/\partial C$, the backward rule is
# $$\frac{\partial L}{\partial A} = G B^\top, \qquad \frac{\partial L}{\partial B} = A^\top G .$$
# (Check the shapes: $A$ is $(n, k)$, $B$ is $(k, m)$, $G$ is $(n, m)$, and $G B^\top$ is
# $(n, k)$ like $A$.) Below, `backward(G)` starts the reverse pass from an arbitrary output
# gradient instead of from a scalar loss.

# %%
rng = np.random.default_rng(0)
A_np, B_np, G_np = rng.standard_normal((4, 3)), rng.standard_normal((3, 2)), rng.standard_normal((4, 2))
A = Tensor(A_np, requires_grad=True, dtype=np.float64)
B = Tensor(B_np, requires_grad=True, dtype=np.float64)
C = A @ B
C.backward(G_np)
print("dL/dA =\n", A.grad)
assert np.allclose(mg.to_numpy(A.grad), G_np @ B_np.T) and np.allclose(mg.to_numpy(B.grad), A_np.T @ G_np)
print("matches G B^T and A^T G")

# %% [markdown]
# ## 5. A backward pass derived by hand: softmax
#
# Everything a transformer does could be written with the primitive ops above, and autograd
# would find every derivative by itself. `minigrad.composed` does exactly that for softmax:
#
#     e = (x - x.max()).exp();  y = e / e.sum()
#
# That builds five graph nodes and keeps their arrays alive until backward. The **fused**
# `minigrad.functional.softmax` is one node with a derivative worked out on paper. With
# $y_i = e^{x_i} / \sum_j e^{x_j}$:
# $$\frac{\partial y_i}{\partial x_j} = y_i(\delta_{ij} - y_j)
#   \quad\Longrightarrow\quad
#   \frac{\partial L}{\partial x_j} = \sum_i g_i\, y_i(\delta_{ij} - y_j)
#   = y_j\Bigl(g_j - \sum_i g_i y_i\Bigr),$$
# where $g = \partial L/\partial y$. Only $y$ needs to be saved. Let us check that the two agree,
# in value and in gradient.

# %%
def count_nodes(t):
    """Number of graph nodes (op outputs) behind a tensor."""
    seen, stack = set(), [t]
    while stack:
        node = stack.pop()
        if id(node) not in seen and node._parents:
            seen.add(id(node))
            stack.extend(node._parents)
    return len(seen)


logits_np = rng.standard_normal((2, 5))
g_np = rng.standard_normal((2, 5))
x_fused = Tensor(logits_np, requires_grad=True, dtype=np.float64)
x_comp = Tensor(logits_np.copy(), requires_grad=True, dtype=np.float64)
y_fused = F.softmax(x_fused, axis=-1)
y_comp = mg.composed.softmax(x_comp, axis=-1)
print("graph nodes: fused", count_nodes(y_fused), "vs composed", count_nodes(y_comp))
y_fused.backward(g_np)
y_comp.backward(g_np)
print("softmax rows sum to", y_fused.numpy().sum(axis=-1))
print("max |value difference|    :", np.abs(y_fused.numpy() - y_comp.numpy()).max())
print("max |gradient difference| :", float(abs(x_fused.grad - x_comp.grad).max()))
assert np.allclose(y_fused.numpy(), y_comp.numpy(), rtol=1e-12, atol=1e-14)
assert np.allclose(mg.to_numpy(x_fused.grad), mg.to_numpy(x_comp.grad), rtol=1e-12, atol=1e-14)

# %% [markdown]
# The same is true for every fused op in `minigrad.functional` (linear, GELU, layer norm,
# embedding, cross-entropy, attention); the test suite checks each one against its twin in
# `minigrad.composed`. Layer norm, for example:

# %%
xs = rng.standard_normal((3, 6))
ws, bs = rng.standard_normal(6), rng.standard_normal(6)
gs = rng.standard_normal((3, 6))
grads = {}
for name, op in [("fused", F.layer_norm), ("composed", mg.composed.layer_norm)]:
    lx, lw, lb = (Tensor(v.copy(), requires_grad=True, dtype=np.float64) for v in (xs, ws, bs))
    out = op(lx, lw, lb)
    out.backward(gs)
    grads[name] = (out.numpy(), *(mg.to_numpy(t.grad) for t in (lx, lw, lb)))
for label, u, v in zip(["y", "dx", "dweight", "dbias"], grads["fused"], grads["composed"]):
    print(f"layer norm {label:8s} max |fused - composed| = {np.abs(u - v).max():.2e}")
    assert np.allclose(u, v, rtol=1e-10, atol=1e-12)

# %% [markdown]
# ## 6. gradcheck: finite differences as the referee
#
# Comparing with a composed twin only works when there is one. `minigrad.gradcheck` compares
# any backward with central finite differences, like section 1, for every element of every
# input (so: tiny inputs, and float64, where the rounding error of a difference quotient is
# about $10^{-16}/h$). It returns True, or raises `GradcheckError` naming the worst element.

# %%
xg = Tensor(rng.standard_normal((2, 4)), requires_grad=True, dtype=np.float64)
wg = Tensor(rng.standard_normal(4), requires_grad=True, dtype=np.float64)
print("softmax   :", mg.gradcheck(lambda x: F.softmax(x), xg))
print("layer norm:", mg.gradcheck(lambda x, w: F.layer_norm(x, w), xg, wg))
print("a composite:", mg.gradcheck(lambda x, w: (F.gelu(x) * w).sum(axis=-1).tanh(), xg, wg))

# %% [markdown]
# Now a new op, written the way every minigrad op is written: compute the output, and if it
# needs a gradient, attach a closure that accumulates $\partial L/\partial x$ into the input.
# The sigmoid $\sigma(x) = 1/(1 + e^{-x})$ has derivative $\sigma(x)(1 - \sigma(x))$. The second
# version below "forgets" the $(1 - \sigma)$ factor, a typical slip. gradcheck catches it.

# %%
def make_sigmoid(correct: bool):
    def sigmoid(x: Tensor) -> Tensor:
        s = 1.0 / (1.0 + np.exp(-x.data))
        out = Tensor._make(s, (x,))
        if out.requires_grad:
            def backward(g):
                x._accumulate(g * s * (1 - s) if correct else g * s)
            out._backward = backward
        return out
    return sigmoid


print("correct sigmoid:", mg.gradcheck(make_sigmoid(True), xg))
try:
    mg.gradcheck(make_sigmoid(False), xg)
    raise AssertionError("gradcheck should have caught the wrong backward")
except mg.GradcheckError as err:
    print("wrong sigmoid  : GradcheckError:", err)

# %% [markdown]
# ## 7. A network that learns
#
# Finally, the whole loop: a two-layer network (`nn.Sequential` of `nn.Linear` and `nn.Tanh`)
# learns XOR, the classic function no single linear layer can represent. Each step:
# forward pass, loss, `backward()` to fill every parameter's `.grad`, and an `AdamW` step that
# moves the parameters against their gradients. This is, at a much smaller scale, exactly what
# training GPT-2 will look like.

# %%
mg.manual_seed(0)
X = Tensor(np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32))
Y = np.array([0, 1, 1, 0])
model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
print("parameters:", [(name, p.shape) for name, p in model.named_parameters()])
opt = optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
losses = []
for step in range(150):
    loss = F.cross_entropy(model(X), Y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if step % 25 == 0 or step == 149:
        print(f"step {step:3d}   loss {loss.item():.4f}")
pred = model(X).numpy().argmax(axis=1)
print("predictions:", pred, "  targets:", Y)
assert losses[-1] < losses[0] / 10, "the loss should fall by at least 10x"
assert (pred == Y).all()

# %% [markdown]
# ## Summary
#
# * A derivative can be measured (finite differences: slow, approximate, but obviously right)
#   or computed exactly with the chain rule.
# * Reverse mode walks the graph from the loss back to the inputs, multiplying local derivatives;
#   one walk gives the gradient with respect to every input. Gradients of a value used twice add.
# * minigrad does this on arrays. Broadcasting is undone by summing; a matrix product's
#   gradients are two more matrix products.
# * Fused ops with hand-derived backwards are faster and leaner than the composed versions, and
#   we trust them because they agree with the composed versions and with `gradcheck`.
#
# The following chapters build GPT-2 out of exactly these pieces.
