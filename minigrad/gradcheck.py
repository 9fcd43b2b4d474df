"""Check analytic gradients against central finite differences.

For a function f of tensors x_1..x_n we compare, for every element of every input that requires
grad, the gradient backward() computes with

    (L(x + eps e_i) - L(x - eps e_i)) / (2 eps),   L = sum(f(x) * R)

where R is a fixed random array: projecting the output onto R checks the whole Jacobian (any
wrong entry changes the result) at the cost of one backward pass. In float64 the truncation error
is O(eps^2) and rounding error O(1e-16 / eps), so eps = 1e-6 gives about 1e-9 agreement.
"""

from __future__ import annotations

import numpy as np

from . import backend
from .tensor import Tensor


class GradcheckError(AssertionError):
    """Analytic and numerical gradients disagree; the message names the worst element."""


def gradcheck(fn, *inputs: Tensor, eps: float = 1e-6, atol: float = 1e-6, rtol: float = 1e-4,
              seed: int = 0) -> bool:
    """Return True if every input's gradient matches finite differences, else raise GradcheckError.

    `fn(*inputs)` must return a Tensor; inputs that need checking must be float64 Tensors with
    requires_grad=True (others, like integer ids, are passed through unchanged).
    """
    checked = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input has requires_grad=True")
    for t in checked:
        if t.dtype != np.float64:
            raise ValueError(f"gradcheck needs float64 inputs (rounding in {t.dtype} swamps the "
                             "finite differences); convert with Tensor(x, dtype=np.float64)")
    out = fn(*inputs)
    R = backend.asarray(np.random.default_rng(seed).standard_normal(out.shape), dtype=np.float64)

    def projected():
        return float(backend.to_numpy((fn(*inputs).data * R).sum()))

    for t in checked:
        t.grad = None
        # A private, contiguous, writable copy: perturbing it through a flat view below must reach
        # this input and only this one (not a transposed array's copy, or another input sharing
        # the same NumPy buffer, as Tensor(a) and Tensor(a) do).
        t.data = t.data.copy()
    fn(*inputs).backward(R)
    analytic = [backend.to_numpy(t.grad) if t.grad is not None else np.zeros(t.shape) for t in checked]

    for k, (t, grad) in enumerate(zip(checked, analytic)):
        flat = t.data.reshape(-1)  # a view: writing into it perturbs t.data
        numeric = np.empty(flat.shape[0])
        for i in range(flat.shape[0]):
            old = float(flat[i])
            flat[i] = old + eps
            plus = projected()
            flat[i] = old - eps
            minus = projected()
            flat[i] = old
            numeric[i] = (plus - minus) / (2 * eps)
        a = grad.reshape(-1)
        err = np.abs(a - numeric) - (atol + rtol * np.abs(numeric))
        worst = int(np.argmax(err))
        if err[worst] > 0:
            idx = np.unravel_index(worst, t.shape)
            raise GradcheckError(
                f"gradient of input {k} (shape {t.shape}) is wrong at index {tuple(int(j) for j in idx)}: "
                f"analytic {a[worst]:.10g}, numerical {numeric[worst]:.10g}, "
                f"|diff| {abs(a[worst] - numeric[worst]):.3g} > atol {atol} + rtol {rtol} * |numerical|")
    return True
