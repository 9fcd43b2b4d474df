"""The fused ops of `functional`, written again from Tensor primitives.

Here autograd derives every backward by itself, through many small graph nodes. These versions
are slower and keep more memory, but they are easy to trust: each line is the textbook formula.
The tests (and chapter 01) check that every fused op equals its composed twin in value *and*
gradient, which is how we know the hand-derived backwards are right.
"""

from __future__ import annotations

import math

from . import backend
from .functional import causal_mask
from .tensor import Tensor, where


def linear(x, weight, bias=None):
    y = x @ weight.T
    return y if bias is None else y + bias


def gelu(x):
    return 0.5 * x * (1.0 + (math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)).tanh())


def softmax(x, axis=-1):
    e = (x - x.max(axis=axis, keepdims=True)).exp()
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - shifted.exp().sum(axis=axis, keepdims=True).log()


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    y = (x - mean) / (var + eps).sqrt()
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def embedding(ids, weight):
    return weight[backend.asarray(ids)]


def cross_entropy(logits, targets, ignore_index=-100):
    V = logits.shape[-1]
    logp = log_softmax(logits.reshape(-1, V), axis=-1)
    t = backend.asarray(targets).reshape(-1)
    valid = t != ignore_index
    picked = logp[backend.xp.arange(t.shape[0]), backend.xp.where(valid, t, 0)]
    weights = Tensor(valid.astype(logits.dtype))
    return -(picked * weights).sum() / float(valid.sum())


def scaled_dot_product_attention(q, k, v, causal=True):
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        scores = where(causal_mask(q.shape[-2], k.shape[-2]), -math.inf, scores)
    return softmax(scores, axis=-1) @ v
