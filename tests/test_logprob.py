"""minigrad.logprob: logsigmoid and the log-probabilities of chosen tokens, gradchecked."""

from __future__ import annotations

import numpy as np
import pytest

import minigrad as mg
from minigrad import F, Tensor, composed, gradcheck
from minigrad.logprob import logsigmoid, sequence_logprobs, token_logprobs

RNG = np.random.default_rng(77)


def t(*shape, scale=1.0):
    return Tensor(RNG.standard_normal(shape) * scale, requires_grad=True, dtype=np.float64)


def test_logsigmoid_values_stability_and_gradcheck(backend):
    x = np.array([-1000.0, -30.0, -1.0, 0.0, 1e-8, 2.0, 40.0, 1000.0])
    got = logsigmoid(Tensor(x, dtype=np.float64)).numpy()
    expected = -np.logaddexp(0.0, -x)       # -log(1 + e^-x), stable in NumPy
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=1e-300)
    assert got[0] == -1000.0 and got[-1] == 0.0
    for dtype in (np.float32, np.float64):  # finite gradients at the extremes, in either precision
        big = Tensor(np.array([-1e4, 1e4]), requires_grad=True, dtype=dtype)
        logsigmoid(big).sum().backward()
        np.testing.assert_allclose(mg.to_numpy(big.grad), [1.0, 0.0], atol=1e-30)
        assert mg.to_numpy(big.grad).dtype == dtype
    assert gradcheck(logsigmoid, t(4, 5, scale=3.0))


def test_logsigmoid_matches_its_composed_formula(backend):
    x = t(20, scale=4.0)
    y = Tensor(x.numpy(), requires_grad=True, dtype=np.float64)
    a = logsigmoid(x)
    b = -((-y).exp() + 1.0).log()      # (less accurate where e^-x is tiny: log(1 + tiny))
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9)
    a.sum().backward()
    b.sum().backward()
    np.testing.assert_allclose(mg.to_numpy(x.grad), mg.to_numpy(y.grad), rtol=1e-12)


def test_token_logprobs_equals_gathered_log_softmax(backend):
    logits = t(2, 5, 7, scale=3.0)
    targets = RNG.integers(0, 7, size=(2, 5))
    got = token_logprobs(logits, targets)
    logp = composed.log_softmax(Tensor(logits.numpy(), dtype=np.float64)).numpy()
    expected = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    assert got.shape == (2, 5)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert gradcheck(lambda z: token_logprobs(z, targets), logits)


def test_token_logprobs_ignores_targets_and_agrees_with_cross_entropy(backend):
    logits = t(3, 4, 6, scale=2.0)
    targets = RNG.integers(0, 6, size=(3, 4))
    targets[0, 1] = targets[2, 3] = -100
    lp = token_logprobs(logits, targets)
    assert lp.numpy()[0, 1] == 0.0 and lp.numpy()[2, 3] == 0.0
    assert gradcheck(lambda z: token_logprobs(z, targets), logits)
    lp.sum().backward()
    g = mg.to_numpy(logits.grad)
    assert not g[0, 1].any() and not g[2, 3].any()        # ignored rows: no gradient
    ce = F.cross_entropy(Tensor(logits.numpy(), dtype=np.float64), targets).item()
    assert -lp.numpy().sum() / 10 == pytest.approx(ce, rel=1e-12)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(logits, targets[:, :2])
    with pytest.raises(TypeError, match="integer"):
        token_logprobs(logits, targets.astype(float))


def test_token_logprobs_is_stable_for_huge_logits_in_float32(backend):
    logits = Tensor(np.array([[1e4, 0.0, -1e4]]), requires_grad=True, dtype=np.float32)
    lp = token_logprobs(logits, np.array([1]))
    assert lp.numpy()[0] == pytest.approx(-1e4)
    lp.sum().backward()
    assert np.isfinite(mg.to_numpy(logits.grad)).all()


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_sums_or_averages_under_the_mask(backend, average):
    logits = t(2, 5, 6, scale=2.0)
    targets = RNG.integers(0, 6, size=(2, 5))
    mask = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=bool)
    got = sequence_logprobs(logits, targets, mask, average=average)
    per_token = token_logprobs(Tensor(logits.numpy(), dtype=np.float64), targets).numpy()
    expected = (per_token * mask).sum(-1) / (mask.sum(-1) if average else 1)
    assert got.shape == (2,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert gradcheck(lambda z: sequence_logprobs(z, targets, mask, average=average), logits)
    # without a mask, every target that is not the ignore index counts
    targets[1, 4] = -100
    unmasked = sequence_logprobs(Tensor(logits.numpy(), dtype=np.float64), targets).numpy()
    per_token = token_logprobs(Tensor(logits.numpy(), dtype=np.float64), targets).numpy()
    np.testing.assert_allclose(unmasked, per_token.sum(-1), rtol=1e-12)
