"""Optimizers (AdamW, SGD), the gradient norm and its clipping, and the learning-rate schedule.

Optimizers update parameters *in place* and keep their state as plain arrays plus a step count,
so `state_dict()` / `load_state_dict()` restore a run exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import backend, kernels


class Optimizer:
    """Holds parameter groups: lists of parameters that share hyper-parameters.

    `params` is either a list of parameters, or a list of dicts like
    `{"params": [...], "weight_decay": 0.0}` whose keys override the optimizer's defaults
    (the usual way to exclude biases and LayerNorm weights from weight decay).

    Frozen parameters (requires_grad=False) are left out of every group: the optimizer keeps
    no state for them and never updates them (so freeze first, then build the optimizer).
    A group may carry "lr_scale" (default 1): `set_lr(lr)`, which a schedule calls every step,
    gives that group lr * lr_scale (a group's own "lr" would be overwritten by it), so
    fine-tuning can train a new head faster than the pretrained body under one schedule.
    """

    def __init__(self, params, defaults: dict):
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        self.param_groups = []
        for group in params:
            trainable = [p for p in group["params"] if p.requires_grad]
            g = {**defaults, **group, "params": trainable}
            if "lr_scale" in group and "lr" not in group:
                g["lr"] = defaults["lr"] * group["lr_scale"]
            self.param_groups.append(g)
        if not self._all_params():
            raise ValueError("optimizer got no trainable parameters (all have requires_grad=False)")
        self.state: list[dict] = [dict() for _ in self._all_params()]
        self.step_count = 0

    def _all_params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _indexed(self):
        """(index, parameter, group) for every parameter, indices in a fixed order."""
        i = 0
        for g in self.param_groups:
            for p in g["params"]:
                yield i, p, g
                i += 1

    def zero_grad(self) -> None:
        for p in self._all_params():
            p.grad = None

    def set_lr(self, lr: float) -> None:
        """Every group's learning rate becomes lr, times the group's "lr_scale" if it has one."""
        for g in self.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{"step": n, "groups": [hyper-parameters], "tensors": {"<i>.<name>": array}}.

        "step" and "groups" are JSON-able; "tensors" is a flat name -> array dict (safetensors).
        """
        groups = [{k: v for k, v in g.items() if k != "params"} | {"num_params": len(g["params"])}
                  for g in self.param_groups]
        tensors = {f"{i}.{name}": arr for i, st in enumerate(self.state) for name, arr in st.items()}
        return {"step": self.step_count, "groups": groups, "tensors": tensors}

    def load_state_dict(self, state: dict) -> None:
        """Back to a state from `state_dict`. ValueError names what does not fit (the state may
        come from a damaged file): groups of other sizes, settings out of range, moments of the
        wrong shape."""
        groups = state["groups"]
        _check_groups(groups, state["step"])
        if [g["num_params"] for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("optimizer state does not match these parameter groups")
        params = self._all_params()
        new_state: list[dict] = [dict() for _ in params]
        for key, arr in state["tensors"].items():
            i, name = key.split(".", 1)
            i = int(i)
            if not 0 <= i < len(params) or tuple(arr.shape) != params[i].shape:
                raise ValueError(f"optimizer state tensor {key} does not match the parameters")
            new_state[i][name] = backend.asarray(arr, dtype=params[i].dtype).copy()
        for g, saved in zip(self.param_groups, groups):
            g.update({k: (tuple(v) if isinstance(v, list) else v)
                      for k, v in saved.items() if k != "num_params"})
        self.state = new_state
        self.step_count = int(state["step"])


def _check_groups(groups, step) -> None:
    """The saved hyper-parameters: a list of groups, each with num_params and settings >= 0
    (betas: two numbers in [0, 1)), and a step count >= 0."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0

    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise ValueError(f"the step count must be an integer >= 0, got {str(step)[:40]}")
    if not (isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups)):
        raise ValueError("the parameter groups must be a non-empty list")
    for g in groups:
        if not (isinstance(g.get("num_params"), int) and number(g["num_params"])):
            raise ValueError("each parameter group needs num_params")
        for k, v in g.items():
            ok = (isinstance(v, (list, tuple)) and len(v) == 2 and all(number(b) and b < 1 for b in v)
                  if k == "betas" else number(v) or isinstance(v, bool))
            if not ok:
                raise ValueError(f"optimizer setting {k!r} has an invalid value {str(v)[:40]}")


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), the update PyTorch's AdamW makes:

        p <- p - lr * wd * p                       (decay the weights, not the gradient)
        m <- b1 m + (1 - b1) g                     (running mean of gradients)
        v <- b2 v + (1 - b2) g^2                   (running mean of squared gradients)
        p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    The (1 - b^t) factors undo the bias of m and v towards their zero start.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        if lr < 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0, got {weight_decay}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def step(self) -> None:
        xp = backend.xp
        self.step_count += 1
        t = self.step_count
        for i, p, g in self._indexed():
            if p.grad is None:
                continue
            lr, (b1, b2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
            st = self.state[i]
            if not st:
                st["m"] = xp.zeros_like(p.data)
                st["v"] = xp.zeros_like(p.data)
            # The formula above, in place on p.data, m and v: in cache-sized chunks with NumPy,
            # one fused kernel with CuPy (see `kernels.adamw_update_`).
            kernels.adamw_update_(p.data, p.grad, st["m"], st["v"], lr, b1, b2, eps, wd, t)


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and (L2) weight decay, as PyTorch's:

        g <- g + wd * p;   buf <- momentum * buf + g   (buf = g on the first step);   p <- p - lr * buf
    """

    def __init__(self, params, lr=1e-2, momentum=0.0, weight_decay=0.0):
        if lr < 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def step(self) -> None:
        self.step_count += 1
        for i, p, g in self._indexed():
            if p.grad is None:
                continue
            grad = p.grad
            if g["weight_decay"]:
                grad = grad + g["weight_decay"] * p.data
            if g["momentum"]:
                st = self.state[i]
                if "momentum" not in st:
                    st["momentum"] = grad.copy()
                else:
                    st["momentum"] *= g["momentum"]
                    st["momentum"] += grad
                grad = st["momentum"]
            p.data -= g["lr"] * grad


def sum_of_squares(arrays) -> float:
    """sum over all `arrays` of a . a, as a Python float, with one transfer to the host: each
    array's dot product stays on the device until all of them are copied over together, then
    they are added one after the other in float64."""
    xp = backend.xp
    arrays = list(arrays)
    if not arrays:
        return 0.0
    per_array = xp.stack([xp.vdot(a.ravel(), a.ravel()) for a in arrays])
    return sum(backend.to_numpy(per_array).astype(np.float64).tolist())


def grad_norm(params) -> float:
    """The global L2 norm of the gradients, sqrt(sum over parameters of |grad|^2), as one vector:
    nan or inf if a gradient is not finite (the training loop checks). Parameters without a
    gradient are skipped; none at all gives 0."""
    return math.sqrt(sum_of_squares(p.grad for p in params if p.grad is not None))


def clip_grad_norm_(params, max_norm: float) -> float:
    """Scale all gradients together so their global L2 norm is at most `max_norm`.

    Returns the norm before clipping (`grad_norm`).
    """
    params = [p for p in params if p.grad is not None]
    total = grad_norm(params)
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in params:  # not in place: one gradient array may be shared by two tensors
            p.grad = p.grad * p.grad.dtype.type(scale)
    return total


@dataclass(frozen=True)
class WarmupCosine:
    """Learning rate as a function of the step: linear warmup to `max_lr`, then cosine decay to
    `min_lr` at `total_steps` (and `min_lr` after). Stateless, so resuming needs only the step.

        sched = WarmupCosine(max_lr=6e-4, warmup_steps=10, total_steps=100)
        optimizer.set_lr(sched(step))
    """

    max_lr: float
    warmup_steps: int
    total_steps: int
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.max_lr * (step + 1) / self.warmup_steps
        if step >= self.total_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (self.max_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
