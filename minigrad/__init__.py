"""minigrad: a small reverse-mode autograd engine over NumPy (CPU) or CuPy (GPU).

    import minigrad as mg
    x = mg.Tensor([[1.0, 2.0]], requires_grad=True)
    y = (x * x).sum()
    y.backward()          # x.grad == [[2., 4.]]
"""

from . import backend, composed, functional, logprob, lora, nn, optim, parallel
from .backend import (
    BackendError,
    get_backend,
    get_default_dtype,
    get_rng_state,
    manual_seed,
    set_backend,
    set_default_dtype,
    set_rng_state,
    to_numpy,
)
from .gradcheck import GradcheckError, gradcheck
from .tensor import Tensor, concat, is_grad_enabled, no_grad, split, stack, tensor, unbind, unbroadcast, where

F = functional

__all__ = [
    "BackendError", "F", "GradcheckError", "Tensor", "backend", "composed", "concat", "functional",
    "get_backend", "get_default_dtype", "get_rng_state", "gradcheck", "is_grad_enabled", "logprob",
    "lora", "manual_seed", "nn", "no_grad", "optim", "parallel", "set_backend", "set_default_dtype",
    "set_rng_state", "split", "stack", "tensor", "to_numpy", "unbind", "unbroadcast", "where",
]
