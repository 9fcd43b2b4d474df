"""The DPO loss (gpt2.finetune.dpo): its formula, its gradient, and a few steps that raise the
reward margin of a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
from gpt2_helpers import ByteTokenizer, tiny_model

import minigrad as mg
from gpt2.finetune import PreferenceDataset, dpo_batch_loss, dpo_loss, response_logprobs
from minigrad import Tensor, gradcheck, no_grad, optim

RNG = np.random.default_rng(5)


def t(*shape, scale=1.0):
    return Tensor(RNG.standard_normal(shape) * scale, requires_grad=True, dtype=np.float64)


def test_dpo_loss_is_the_formula_and_reports_rewards(backend):
    pc, pr = t(4), t(4)
    rc, rr = RNG.standard_normal(4), RNG.standard_normal(4)
    out = dpo_loss(pc, pr, rc, rr, beta=0.5)
    z = 0.5 * ((pc.numpy() - rc) - (pr.numpy() - rr))
    assert out.loss.item() == pytest.approx(np.mean(np.logaddexp(0.0, -z)), rel=1e-12)  # -log sigmoid
    assert out.chosen_reward == pytest.approx(np.mean(pc.numpy() - rc), rel=1e-12)
    assert out.rejected_reward == pytest.approx(np.mean(pr.numpy() - rr), rel=1e-12)
    assert out.reward_margin == pytest.approx(out.chosen_reward - out.rejected_reward)
    assert gradcheck(lambda pc, pr: dpo_loss(pc, pr, rc, rr, beta=0.5).loss, pc, pr)
    # the reference is a constant: a Tensor that needs grad does not receive one
    rc_t = Tensor(rc, requires_grad=True, dtype=np.float64)
    dpo_loss(pc, pr, rc_t, rr).loss.backward()
    assert rc_t.grad is None and pc.grad is not None


def test_dpo_loss_starts_at_log_2():
    logps = Tensor(np.array([-3.0, -1.5]), requires_grad=True, dtype=np.float64)
    out = dpo_loss(logps, logps * 1.0, logps.numpy(), logps.numpy())
    assert out.loss.item() == pytest.approx(np.log(2.0)) and out.reward_margin == 0.0


@pytest.mark.parametrize("average", [True, False])
def test_response_logprobs_shifts_targets_and_mask(backend, average):
    logits = t(2, 5, 9, scale=2.0)
    ids = RNG.integers(0, 9, size=(2, 5))
    mask = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=bool)
    got = response_logprobs(logits, ids, mask, average=average).numpy()
    lp = np.log(np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(-1, keepdims=True))
    expected = []
    for b in range(2):  # position t predicts token t + 1; token t counts when mask[b, t]
        picked = [lp[b, i - 1, ids[b, i]] for i in range(1, 5) if mask[b, i]]
        expected.append(np.mean(picked) if average else np.sum(picked))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert gradcheck(lambda z: response_logprobs(z, ids, mask, average=average), logits)


def test_a_few_dpo_steps_raise_the_reward_margin(backend):
    """Policy and reference start as copies (loss log 2); AdamW on the DPO loss then makes the
    chosen answers relatively more likely than the rejected ones."""
    tok = ByteTokenizer()
    entries = [{"instruction": "Say hi", "input": "", "chosen": "Hello!", "rejected": "Go away."},
               {"instruction": "Add", "input": "2+2", "chosen": "4, gladly.", "rejected": "4. Obviously."}]
    chosen, rejected = PreferenceDataset(entries, tok, pad_id=0).batch(np.arange(2))
    policy = tiny_model(seed=1, vocab_size=256, context_length=256)
    reference = tiny_model(seed=1, vocab_size=256, context_length=256)
    reference.requires_grad_(False)
    with no_grad():
        rc = response_logprobs(reference(chosen.ids), chosen.ids, chosen.mask)
        rr = response_logprobs(reference(rejected.ids), rejected.ids, rejected.mask)
    assert not rc.requires_grad
    opt = optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.0)
    margins = []
    for _ in range(4):
        opt.zero_grad()
        pc = response_logprobs(policy(chosen.ids), chosen.ids, chosen.mask)
        pr = response_logprobs(policy(rejected.ids), rejected.ids, rejected.mask)
        out = dpo_loss(pc, pr, rc, rr, beta=0.1)
        if not margins:
            assert out.loss.item() == pytest.approx(np.log(2.0), abs=1e-6)
        margins.append(out.reward_margin)
        out.loss.backward()
        opt.step()
    assert margins[0] == pytest.approx(0.0, abs=1e-6) and margins[-1] > 0.05
    assert all(a < b for a, b in zip(margins, margins[1:]))
    assert all(p.grad is None for p in reference.parameters())
    assert mg.get_backend() == backend


def test_dpo_batch_loss_is_the_four_passes(backend):
    tok = ByteTokenizer()
    entries = [{"instruction": "Say hi", "input": "", "chosen": "Hello!", "rejected": "Go away."}]
    chosen, rejected = PreferenceDataset(entries, tok, pad_id=0).batch(np.arange(1))
    policy = tiny_model(seed=1, vocab_size=256, context_length=256)
    reference = tiny_model(seed=2, vocab_size=256, context_length=256)
    out = dpo_batch_loss(policy, reference, chosen, rejected, beta=0.2)
    pc = response_logprobs(policy(chosen.ids), chosen.ids, chosen.mask)
    pr = response_logprobs(policy(rejected.ids), rejected.ids, rejected.mask)
    rc = response_logprobs(reference(chosen.ids), chosen.ids, chosen.mask)
    rr = response_logprobs(reference(rejected.ids), rejected.ids, rejected.mask)
    manual = dpo_loss(pc, pr, rc.detach(), rr.detach(), beta=0.2)
    assert out.loss.item() == pytest.approx(manual.loss.item(), rel=1e-6)
    assert out.reward_margin == pytest.approx(manual.reward_margin, rel=1e-6, abs=1e-7)
    out.loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert all(p.grad is not None for p in policy.parameters())
