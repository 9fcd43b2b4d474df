"""Optimizers against independent NumPy implementations of the published update rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

import minigrad as mg
from minigrad import Tensor, optim
from minigrad.nn import Parameter

RNG = np.random.default_rng(99)
STEPS = 6


def quadratic_problem():
    """Parameters, and a loss whose gradient depends on them: L = sum(c * w^2) + sum(d * b)."""
    w0, b0 = RNG.standard_normal((3, 4)), RNG.standard_normal(4)
    c, d = np.abs(RNG.standard_normal((3, 4))) + 0.1, RNG.standard_normal(4)

    def grads(w, b):  # dL/dw = 2 c w, dL/db = d
        return 2 * c * w, d

    def loss(w, b):
        return (Tensor(c) * w * w).sum() + (Tensor(d) * b).sum()

    return w0, b0, grads, loss


def params_of(w0, b0):
    return Parameter(w0.copy(), dtype=np.float64), Parameter(b0.copy(), dtype=np.float64)


def run(opt, w, b, loss, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss(w, b).backward()
        opt.step()


# ---------------------------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------------------------

def adamw_reference(p, grad_fn, steps, lr, b1, b2, eps, wd):
    """AdamW (Loshchilov & Hutter 2019, Algorithm 2; PyTorch's torch.optim.AdamW), written out:

        p_t = p_{t-1} - lr * wd * p_{t-1}                      decoupled weight decay
        m_t = b1 m_{t-1} + (1 - b1) g_t
        v_t = b2 v_{t-1} + (1 - b2) g_t^2
        m^_t = m_t / (1 - b1^t),  v^_t = v_t / (1 - b2^t)      bias correction
        p_t = p_t - lr * m^_t / (sqrt(v^_t) + eps)
    """
    p = [x.copy() for x in p]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    for t in range(1, steps + 1):
        g = grad_fn(*p)
        for i in range(len(p)):
            p[i] = p[i] - lr * wd[i] * p[i]
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            m_hat = m[i] / (1 - b1 ** t)
            v_hat = v[i] / (1 - b2 ** t)
            p[i] = p[i] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def test_adamw_matches_reference(backend):
    w0, b0, grads, loss = quadratic_problem()
    lr, betas, eps, wd = 0.05, (0.8, 0.95), 1e-6, 0.1
    w, b = params_of(w0, b0)
    opt = optim.AdamW([w, b], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    run(opt, w, b, loss, STEPS)
    ref_w, ref_b = adamw_reference([w0, b0], grads, STEPS, lr, *betas, eps, wd=[wd, wd])
    np.testing.assert_allclose(w.numpy(), ref_w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.numpy(), ref_b, rtol=1e-12, atol=1e-14)
    assert opt.step_count == STEPS
    assert np.abs(w.numpy() - w0).max() > 0.1  # it really moved


def test_adamw_per_group_weight_decay(backend):
    w0, b0, grads, loss = quadratic_problem()
    lr, wd = 0.05, 0.3
    w, b = params_of(w0, b0)
    opt = optim.AdamW([{"params": [w]}, {"params": [b], "weight_decay": 0.0}], lr=lr, weight_decay=wd)
    assert [g["weight_decay"] for g in opt.param_groups] == [wd, 0.0]
    run(opt, w, b, loss, STEPS)
    ref_w, ref_b = adamw_reference([w0, b0], grads, STEPS, lr, 0.9, 0.999, 1e-8, wd=[wd, 0.0])
    np.testing.assert_allclose(w.numpy(), ref_w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.numpy(), ref_b, rtol=1e-12, atol=1e-14)


def test_adamw_decay_alone_with_zero_gradients(backend):
    """With g = 0 Adam's step is 0, so only the decoupled decay acts: p <- p (1 - lr wd) per step."""
    decayed = Parameter(np.ones(3), dtype=np.float64)
    exempt = Parameter(np.ones(3), dtype=np.float64)
    opt = optim.AdamW([{"params": [decayed], "weight_decay": 0.5}, {"params": [exempt], "weight_decay": 0.0}],
                      lr=0.1)
    for _ in range(5):
        decayed.grad = mg.backend.xp.zeros(3)
        exempt.grad = mg.backend.xp.zeros(3)
        opt.step()
    np.testing.assert_allclose(decayed.numpy(), (1 - 0.1 * 0.5) ** 5, rtol=1e-12)
    np.testing.assert_array_equal(exempt.numpy(), 1.0)


def test_adamw_skips_parameters_without_grad(backend):
    a, b = Parameter(np.ones(2), dtype=np.float64), Parameter(np.ones(2), dtype=np.float64)
    opt = optim.AdamW([a, b], lr=0.1)
    a.grad = mg.backend.asarray(np.array([1.0, -1.0]))
    opt.step()
    np.testing.assert_array_equal(b.numpy(), 1.0)
    # first Adam step moves each weight by lr (times sign(g)), after decay by (1 - lr * wd)
    np.testing.assert_allclose(a.numpy(), [0.999 - 0.1, 0.999 + 0.1], rtol=1e-6)


def test_optimizer_argument_checks():
    p = Parameter(np.ones(2))
    with pytest.raises(ValueError, match="empty"):
        optim.AdamW([])
    with pytest.raises(ValueError):
        optim.AdamW([p], lr=-1.0)
    with pytest.raises(ValueError):
        optim.AdamW([p], weight_decay=-0.1)
    with pytest.raises(ValueError):
        optim.AdamW([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError):
        optim.SGD([p], lr=-1.0)


# ---------------------------------------------------------------------------------------------
# SGD
# ---------------------------------------------------------------------------------------------

def sgd_reference(p, grad_fn, steps, lr, momentum, wd):
    """SGD with momentum and L2 weight decay (PyTorch's torch.optim.SGD, dampening 0, no Nesterov):

        g_t = grad + wd * p_{t-1}
        buf_1 = g_1;  buf_t = momentum * buf_{t-1} + g_t
        p_t = p_{t-1} - lr * buf_t          (buf_t = g_t when momentum is 0)
    """
    p = [x.copy() for x in p]
    buf = [None] * len(p)
    for _ in range(steps):
        g = grad_fn(*p)
        for i in range(len(p)):
            gi = g[i] + wd * p[i]
            if momentum:
                buf[i] = gi.copy() if buf[i] is None else momentum * buf[i] + gi
                gi = buf[i]
            p[i] = p[i] - lr * gi
    return p


@pytest.mark.parametrize("momentum, wd", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.1), (0.9, 0.1)])
def test_sgd_matches_reference(backend, momentum, wd):
    w0, b0, grads, loss = quadratic_problem()
    lr = 0.05
    w, b = params_of(w0, b0)
    opt = optim.SGD([w, b], lr=lr, momentum=momentum, weight_decay=wd)
    run(opt, w, b, loss, STEPS)
    ref_w, ref_b = sgd_reference([w0, b0], grads, STEPS, lr, momentum, wd)
    np.testing.assert_allclose(w.numpy(), ref_w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.numpy(), ref_b, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make_opt", [
    lambda ps: optim.AdamW(ps, lr=0.05, weight_decay=0.1),
    lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1),
], ids=["adamw", "sgd"])
def test_resume_from_state_dict_equals_uninterrupted(backend, make_opt):
    w0, b0, _, loss = quadratic_problem()

    w, b = params_of(w0, b0)
    uninterrupted = make_opt([w, b])
    run(uninterrupted, w, b, loss, 2 * STEPS)

    w1, b1 = params_of(w0, b0)
    first = make_opt([w1, b1])
    run(first, w1, b1, loss, STEPS)
    # a checkpoint: host copies of everything (what would be written to disk)
    saved = first.state_dict()
    saved = {"step": saved["step"], "groups": [dict(g) for g in saved["groups"]],
             "tensors": {k: mg.to_numpy(v).copy() for k, v in saved["tensors"].items()}}
    saved_params = (w1.numpy().copy(), b1.numpy().copy())
    assert saved["step"] == STEPS

    w2, b2 = params_of(*saved_params)
    resumed = make_opt([w2, b2])
    resumed.load_state_dict(saved)
    assert resumed.step_count == STEPS
    run(resumed, w2, b2, loss, STEPS)
    np.testing.assert_array_equal(w2.numpy(), w.numpy())
    np.testing.assert_array_equal(b2.numpy(), b.numpy())


def test_load_state_dict_restores_hyperparameters_and_checks_shapes(backend):
    p = Parameter(np.ones(3), dtype=np.float64)
    opt = optim.AdamW([p], lr=0.01, betas=(0.5, 0.6))
    p.grad = mg.backend.xp.ones(3)
    opt.step()
    state = opt.state_dict()
    assert state["groups"][0]["betas"] == (0.5, 0.6) and state["groups"][0]["num_params"] == 1
    state["groups"][0]["betas"] = [0.5, 0.6]  # as it comes back from JSON
    other = optim.AdamW([Parameter(np.ones(3), dtype=np.float64)], lr=0.5)
    other.load_state_dict(state)
    assert other.param_groups[0]["lr"] == 0.01 and other.param_groups[0]["betas"] == (0.5, 0.6)

    with pytest.raises(ValueError, match="parameter groups"):
        optim.AdamW([Parameter(np.ones(3)), Parameter(np.ones(3))]).load_state_dict(state)
    with pytest.raises(ValueError, match="does not match"):
        optim.AdamW([Parameter(np.ones(4))]).load_state_dict(state)


def test_set_lr(backend):
    opt = optim.SGD([{"params": [Parameter(np.ones(1))]}, {"params": [Parameter(np.ones(1))], "lr": 5.0}])
    opt.set_lr(0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]


# ---------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------

def global_norm(params):
    return math.sqrt(sum(float((mg.to_numpy(p.grad) ** 2).sum()) for p in params))


def test_clip_grad_norm(backend):
    a, b = Parameter(np.zeros((2, 3)), dtype=np.float64), Parameter(np.zeros(4), dtype=np.float64)
    ga, gb = RNG.standard_normal((2, 3)) * 3, RNG.standard_normal(4) * 3
    a.grad, b.grad = mg.backend.asarray(ga), mg.backend.asarray(gb)
    expected = math.sqrt((ga ** 2).sum() + (gb ** 2).sum())
    assert expected > 1.0
    norm = optim.clip_grad_norm_([a, b], max_norm=1.0)
    assert norm == pytest.approx(expected, rel=1e-12)  # the norm before clipping
    assert global_norm([a, b]) == pytest.approx(1.0, rel=1e-5)
    # clipping scales all gradients together: directions are unchanged
    np.testing.assert_allclose(mg.to_numpy(a.grad) * expected, ga, rtol=1e-5)
    np.testing.assert_allclose(mg.to_numpy(b.grad) * expected, gb, rtol=1e-5)


def test_clip_grad_norm_leaves_small_gradients_alone(backend):
    a = Parameter(np.zeros(3), dtype=np.float64)
    a.grad = mg.backend.asarray(np.array([0.3, 0.0, 0.4]))
    assert optim.clip_grad_norm_([a, Parameter(np.zeros(2))], max_norm=1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(mg.to_numpy(a.grad), [0.3, 0.0, 0.4])
    assert optim.clip_grad_norm_([Parameter(np.zeros(2))], max_norm=1.0) == 0.0


def test_clip_grad_norm_does_not_touch_a_shared_gradient_array(backend):
    shared = mg.backend.asarray(np.array([3.0, 4.0]))
    a = Parameter(np.zeros(2), dtype=np.float64)
    a.grad = shared
    optim.clip_grad_norm_([a], max_norm=1.0)
    np.testing.assert_array_equal(mg.to_numpy(shared), [3.0, 4.0])
    np.testing.assert_allclose(mg.to_numpy(a.grad), [0.6, 0.8], rtol=1e-5)


def test_clip_grad_norm_reports_non_finite(backend):
    a = Parameter(np.zeros(2), dtype=np.float64)
    a.grad = mg.backend.asarray(np.array([np.inf, 1.0]))
    with np.errstate(invalid="ignore"):  # the scaled gradient is inf * 0; the caller skips the step
        assert not math.isfinite(optim.clip_grad_norm_([a], max_norm=1.0))


def test_grad_norm_is_the_global_norm_with_one_transfer(backend, monkeypatch):
    """One home for the gradient norm: float32 and float64 gradients, parameters without one
    skipped, nan and inf kept, and the per-parameter sums copied to the host once."""
    a, b, c = (Parameter(np.zeros(s)) for s in ((2, 3), 5, 4))
    ga, gb = RNG.standard_normal((2, 3)).astype(np.float32), RNG.standard_normal(5)
    a.grad, b.grad = mg.backend.asarray(ga), mg.backend.asarray(gb)
    transfers = []
    real = mg.backend.to_numpy
    monkeypatch.setattr(mg.backend, "to_numpy", lambda x: transfers.append(1) or real(x))
    norm = optim.grad_norm([a, b, c])
    assert len(transfers) == 1
    assert norm == math.sqrt(float(np.vdot(ga, ga)) + float(np.vdot(gb, gb)))
    assert optim.grad_norm([c]) == 0.0
    for bad in (np.nan, np.inf):
        b.grad = mg.backend.asarray(np.array([1.0, bad, 0.0, 0.0, 0.0]))
        result = optim.grad_norm([a, b])
        assert math.isnan(result) if np.isnan(bad) else result == math.inf


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------

def test_warmup_cosine():
    sched = optim.WarmupCosine(max_lr=1.0, warmup_steps=10, total_steps=110, min_lr=0.1)
    assert sched(0) == pytest.approx(0.1)  # warmup: max_lr * (step + 1) / warmup_steps
    assert sched(4) == pytest.approx(0.5)
    assert sched(9) == pytest.approx(1.0)
    assert sched(10) == pytest.approx(1.0)  # peak
    assert sched(60) == pytest.approx(0.55)  # halfway through the decay: (max + min) / 2
    assert sched(35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert sched(110) == pytest.approx(0.1)  # end
    assert sched(10_000) == pytest.approx(0.1)
    lrs = [sched(s) for s in range(10, 111)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))  # monotone decay after warmup
    assert optim.WarmupCosine(max_lr=6e-4, warmup_steps=0, total_steps=10)(0) == pytest.approx(6e-4)
