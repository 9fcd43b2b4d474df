"""Log-probabilities for preference tuning (DPO): of the tokens a sequence has, and of a sigmoid.

DPO compares how likely a model finds a chosen and a rejected response, so it needs
log p(response | prompt) = sum over the response's tokens of log softmax(logits)[token]:
`token_logprobs` picks one log-probability per position (a gather, fused with log-softmax so the
(N, V) log-softmax is never a graph node of its own), and `sequence_logprobs` sums (or averages)
them under a mask. `logsigmoid` is the loss's outer function, written so that it never
overflows.
"""

from __future__ import annotations

from . import backend
from .functional import int_ids
from .tensor import Tensor


def logsigmoid(x: Tensor) -> Tensor:
    """log sigmoid(x) = -log(1 + e^{-x}), elementwise, finite for every finite x.

    Forward: log sigmoid(x) = min(x, 0) - log(1 + e^{-|x|}). (For x >= 0 that is the formula
    itself; for x < 0 multiply the fraction by e^x / e^x first.) e^{-|x|} is at most 1, so nothing
    overflows, and log1p keeps the small term accurate when it is tiny (x large).
    Backward: d/dx log sigmoid(x) = 1 - sigmoid(x) = sigmoid(-x), computed from the same
    e = e^{-|x|}: sigmoid(-x) = e / (1 + e) for x >= 0 and 1 / (1 + e) for x < 0.
    Saved: e (x is alive anyway).
    """
    xp = backend.xp
    xd = x.data
    e = xp.exp(-xp.abs(xd))
    out = Tensor._make(xp.minimum(xd, 0) - xp.log1p(e), (x,))
    if out.requires_grad:
        def backward(g):
            sig_neg = xp.where(xd >= 0, e, 1) / (1 + e)  # sigmoid(-x)
            x._accumulate(g * sig_neg)
        out._backward = backward
    return out


def token_logprobs(logits: Tensor, targets, ignore_index: int = -100) -> Tensor:
    """log softmax(logits)[..., target] per position: logits (..., V), targets (...) -> (...).

    Positions whose target is `ignore_index` give 0 (and no gradient), so padding can sit in
    the targets as it does for cross-entropy.

    Forward, per row z with target t and m = max z (subtracted first, as in log_softmax):
      y = z_t - m - log sum_j e^{z_j - m}
    Backward: dy/dz_j = [j == t] - softmax(z)_j, so dL/dz = g * (onehot(t) - p), zero on
    ignored rows. Saved: the (N, V) probabilities p, made in place from the exponentials the
    forward pass computes anyway, and turned into the gradient in place (backward runs once).
    The mean of -token_logprobs over the counted targets is exactly cross_entropy.
    """
    xp = backend.xp
    V = logits.shape[-1]
    z = logits.data.reshape(-1, V)                                    # (N, V)
    t = int_ids(targets).reshape(-1)                             # (N,)
    if t.shape[0] != z.shape[0]:
        raise ValueError(f"token_logprobs: {z.shape[0]} rows of logits but {t.shape[0]} targets")
    valid = t != ignore_index
    t_safe = xp.where(valid, t, 0)
    rows = xp.arange(z.shape[0])
    m = z.max(axis=1, keepdims=True)                                  # (N, 1)
    probs = z - m                                                     # (N, V), a new buffer
    picked = probs[rows, t_safe]                                      # z_t - m, (N,)
    xp.exp(probs, out=probs)
    total = probs.sum(axis=1, keepdims=True)                          # sum_j e^{z_j - m}
    y = (picked - xp.log(total[:, 0])) * valid                        # (N,), 0 where ignored
    out = Tensor._make(y.astype(z.dtype, copy=False).reshape(logits.shape[:-1]), (logits,))
    if out.requires_grad:
        probs /= total                                                # softmax, in place

        def backward(g):
            gv = (g.reshape(-1) * valid).astype(probs.dtype, copy=False)  # (N,), 0 if ignored
            grad = probs                                              # becomes -g p, in place
            grad *= -gv[:, None]
            grad[rows, t_safe] += gv                                  # + g at each target
            logits._accumulate(grad.reshape(logits.shape))
        out._backward = backward
    return out


def sequence_logprobs(logits: Tensor, targets, mask=None, average: bool = False,
                      ignore_index: int = -100) -> Tensor:
    """log p(sequence) for each row of a batch: the sum over positions of token_logprobs where
    `mask` is true; logits (B, T, V), targets and mask (B, T) -> (B,).

    `mask` (booleans or 0/1) selects the response tokens (DPO leaves out the prompt and the
    padding); without one, every target that is not `ignore_index` counts. `average=True` divides
    each row's sum by its number of counted tokens, as the book's DPO notebook does; the DPO paper
    uses the sum. Built from token_logprobs and two Tensor ops, so its gradient needs no code of
    its own: each counted position passes g (or g / count) to its token.
    """
    lp = token_logprobs(logits, targets, ignore_index)                # (B, T)
    if mask is None:
        weights = int_ids(targets) != ignore_index
    else:
        weights = backend.asarray(mask.data if isinstance(mask, Tensor) else mask) != 0
    weights = weights.astype(lp.dtype)                                # (B, T) of 0 and 1
    total = (lp * Tensor(weights)).sum(axis=-1)                       # (B,)
    if not average:
        return total
    counts = weights.sum(axis=-1)
    return total * Tensor(1.0 / backend.xp.maximum(counts, 1))


__all__ = ["logsigmoid", "sequence_logprobs", "token_logprobs"]
