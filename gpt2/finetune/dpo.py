"""Direct Preference Optimization (Rafailov et al., 2023): the loss, written out.

DPO fine-tunes a policy model pi so that, relative to a frozen reference model pi_ref (its copy
before DPO), it makes the chosen response y_w more likely and the rejected one y_l less likely:

    loss = -mean over the batch of  log sigmoid(beta * (log pi(y_w|x)/pi_ref(y_w|x)
                                                        - log pi(y_l|x)/pi_ref(y_l|x)))

Each log-ratio is an "implicit reward" of its response. The loss is log 2 = 0.693 at the start
(pi = pi_ref, both ratios 0) and falls as the margin between the chosen and the rejected reward
grows; beta sets how far pi may move from pi_ref for a given gain (the book uses 0.1).

    chosen, rejected = batch                                     # from preference_loader
    pc = response_logprobs(policy(chosen.ids), chosen.ids, chosen.mask)
    pr = response_logprobs(policy(rejected.ids), rejected.ids, rejected.mask)
    with no_grad():
        rc = response_logprobs(reference(chosen.ids), chosen.ids, chosen.mask)
        rr = response_logprobs(reference(rejected.ids), rejected.ids, rejected.mask)
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)     # or: dpo_batch_loss(policy, reference, *batch)
    out.loss.backward(); log(out.reward_margin)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from minigrad import backend
from minigrad.logprob import logsigmoid, sequence_logprobs
from minigrad.tensor import Tensor, no_grad

from ..evaluate import Evaluation


class DPOLoss(NamedTuple):
    loss: Tensor             # scalar: what backward() is called on
    chosen_reward: float     # batch mean of log pi(y_w|x) - log pi_ref(y_w|x)
    rejected_reward: float   # batch mean of log pi(y_l|x) - log pi_ref(y_l|x)
    reward_margin: float     # chosen_reward - rejected_reward: grows as DPO learns


def response_logprobs(logits: Tensor, ids, mask, average: bool = True) -> Tensor:
    """log pi(response | prompt) per sequence, (B,), from the model's logits (B, T, V) for the
    sequences `ids` (B, T) and the mask (B, T) of the tokens to score.

    Position t predicts token t + 1, so the targets are ids shifted left by one and the mask is
    shifted with them (the first token is never predicted; the last position predicts nothing
    and gets the ignore index). The book's DPO notebook averages over the scored tokens
    (average=True, its default here) rather than summing as the paper does; averaging keeps
    long and short responses on one scale.
    """
    ids = np.asarray(backend.to_numpy(ids))
    mask = np.asarray(backend.to_numpy(mask)).astype(bool)
    targets = np.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    scored = np.zeros_like(mask)
    scored[:, :-1] = mask[:, 1:]
    return sequence_logprobs(logits, backend.asarray(targets), backend.asarray(scored), average=average)


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps, ref_rejected_logps, beta: float = 0.1) -> DPOLoss:
    """The DPO loss of a batch, from sequence log-probabilities, each (B,).

    The reference's log-probabilities are constants (Tensors made under no_grad, or arrays);
    the gradient reaches the policy through both of its terms. With z = beta * margin per pair,
    d(-log sigmoid z)/dz = -sigmoid(-z): pairs the policy already ranks right (z >> 0) pass
    almost no gradient, wrongly ranked pairs pass up to beta per unit of log-ratio.

    The rewards are reported as in the book's notebook, without the factor beta (the paper's
    implicit reward is beta times these).
    """
    ref_chosen = _constant(ref_chosen_logps, policy_chosen_logps)
    ref_rejected = _constant(ref_rejected_logps, policy_chosen_logps)
    chosen_ratio = policy_chosen_logps - ref_chosen            # (B,) log pi/pi_ref for y_w
    rejected_ratio = policy_rejected_logps - ref_rejected      # (B,) for y_l
    loss = -logsigmoid((chosen_ratio - rejected_ratio) * beta).mean()
    chosen_reward = float(backend.to_numpy(chosen_ratio.data).mean())
    rejected_reward = float(backend.to_numpy(rejected_ratio.data).mean())
    return DPOLoss(loss, chosen_reward, rejected_reward, chosen_reward - rejected_reward)


def _constant(x, like: Tensor) -> Tensor:
    """A reference value as a constant Tensor of `like`'s dtype (any graph behind it is cut)."""
    data = x.data if isinstance(x, Tensor) else backend.asarray(x)
    return Tensor(data, dtype=like.dtype)


def dpo_batch_loss(policy, reference, chosen, rejected, beta: float = 0.1,
                   average: bool = True) -> DPOLoss:
    """The DPO loss of one (chosen, rejected) batch from `preference_loader`: four forward
    passes, the reference's without a graph (keep the reference in eval mode and frozen)."""
    pc = response_logprobs(policy(chosen.ids), chosen.ids, chosen.mask, average)
    pr = response_logprobs(policy(rejected.ids), rejected.ids, rejected.mask, average)
    with no_grad():
        rc = response_logprobs(reference(chosen.ids), chosen.ids, chosen.mask, average)
        rr = response_logprobs(reference(rejected.ids), rejected.ids, rejected.mask, average)
    return dpo_loss(pc, pr, rc, rr, beta)


def dpo_stacked_loss(policy, reference, ids, mask, beta: float = 0.1, average: bool = True) -> DPOLoss:
    """The DPO loss of a stacked batch (`PreferenceDataset(..., stacked=True)`): ids and mask
    (2B, T), the B chosen sequences first, then their B rejected ones. Each model runs once over
    all 2B rows instead of twice over B (the same numbers as dpo_batch_loss, to rounding)."""
    B = ids.shape[0] // 2
    logps = response_logprobs(policy(ids), ids, mask, average)                  # (2B,)
    with no_grad():
        ref = response_logprobs(reference(ids), ids, mask, average)             # (2B,), no graph
    return dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta)


class DPOObjective:
    """DPO for gpt2.train.train: `loss_fn(ids, mask, model)` of a stacked batch, closing over the
    frozen reference and beta, and `evaluate` (its `eval_fn`): the loss and the rewards of
    eval_iter batches of each loader, printed as the book's DPO notebook does."""

    def __init__(self, reference, beta: float = 0.1):
        self.reference, self.beta = reference, beta

    def __call__(self, ids, mask, model) -> Tensor:
        return dpo_stacked_loss(model, self.reference, ids, mask, self.beta).loss

    def measure(self, model, loader, max_batches: int | None = None) -> dict:
        """Mean loss, chosen and rejected rewards and reward margin over a loader's first
        `max_batches` batches (all when None), in eval mode without a graph."""
        was_training = model.training
        model.eval()
        totals, n = np.zeros(4), 0
        try:
            with no_grad():
                for i, (ids, mask) in enumerate(loader.batches()):
                    if max_batches is not None and i >= max_batches:
                        break
                    out = dpo_stacked_loss(model, self.reference, ids, mask, self.beta)
                    totals += (out.loss.item(), out.chosen_reward, out.rejected_reward, out.reward_margin)
                    n += 1
        finally:
            model.train(was_training)
        values = totals / n if n else np.full(4, np.nan)
        return dict(zip(("loss", "chosen_reward", "rejected_reward", "reward_margin"), map(float, values)))

    def evaluate(self, model, train_loader, val_loader, eval_iter: int | None, key: int = 0) -> Evaluation:
        metrics, text = {}, ""
        for split, loader in (("train", train_loader), ("val", val_loader)):
            m = self.measure(model, loader, eval_iter)
            metrics |= {f"{split}_{k}": v for k, v in m.items() if k != "loss"}
            metrics[f"{split}_loss"] = m["loss"]
            text += (f", {split.capitalize()} reward margin {m['reward_margin']:.3f} (chosen "
                     f"{m['chosen_reward']:.3f}, rejected {m['rejected_reward']:.3f})")
        return Evaluation(metrics.pop("train_loss"), metrics.pop("val_loss"), metrics, text)
