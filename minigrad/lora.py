"""LoRA: fine-tune a big linear layer by learning a small low-rank correction to it.

Hu et al. (2021), "LoRA: Low-Rank Adaptation of Large Language Models"; the book's appendix E.
A pretrained layer y = x W^T + b keeps W (out, in) and b frozen and learns

    y = x W^T + b + s * (x A) B,      A (in, r),  B (r, out),  s = alpha / r

with a rank r much smaller than in and out: r (in + out) trainable numbers instead of in * out
(for GPT-2 124M's 768 x 3072 MLP layer and r = 16, 61k instead of 2.4M). B starts at zero, so
the adapted model starts out exactly equal to the pretrained one, and A starts random, so the
gradient for B, s (x A)^T g, is not zero and learning can begin. Dividing by r makes alpha
roughly independent of the rank: changing r does not change how far one step moves y.

    model.requires_grad_(False)                    # freeze the pretrained weights
    apply_lora(model, rank=16, alpha=16)           # every Linear -> LoRALinear (A, B trainable)
    opt = AdamW(model.trainable_parameters())      # only the A's and B's
    ...                                            # train
    merge_lora(model)                              # W += s (A B)^T; plain Linear layers again

A LoRALinear keeps the Linear's `weight` and `bias` under the same names (the same Parameter
objects), so a pretrained state dict loads into the adapted model with `strict=False`, and after
`merge_lora` the model's state dict has exactly the base model's names again.
"""

from __future__ import annotations

import math

from . import backend
from .nn import Linear, Module, ModuleList, Parameter
from .tensor import Tensor


def low_rank_update(x: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """s * (x A) B for x (..., in), A (in, r), B (r, out) -> (..., out), as one graph node.

    Forward, with the leading axes of x flattened to N rows:
      u = x A                (N, r)     saved: it is small, and B's gradient needs it
      y = (s u) B            (N, out)
    Backward, with g = dL/dy (N, out) and the chain rule through the two products:
      dL/du = s g B^T        (N, r)
      dL/dx = (dL/du) A^T    (N, in)
      dL/dA = x^T (dL/du)    (in, r)
      dL/dB = (s u)^T g      (r, out)
    Every product involves the rank r, so the update costs O(N r (in + out)): a few percent of
    the frozen layer's N in out when r is small. Flattening the rows first makes each product one
    2-D GEMM (no per-batch loop, and A's gradient needs no sum over batch axes afterwards).
    """
    in_features, out_features = A.shape[0], B.shape[1]
    x2 = x.data.reshape(-1, in_features)                             # (N, in)
    su = x2 @ A.data                                                 # (N, r)
    su *= su.dtype.type(scale)                                       # s u
    y = su @ B.data                                                  # (N, out)
    out = Tensor._make(y.reshape(x.shape[:-1] + (out_features,)), (x, A, B))
    if out.requires_grad:
        def backward(g):
            g2 = g.reshape(-1, out_features)                         # (N, out)
            if B.requires_grad:
                B._accumulate(su.T @ g2)
            if x.requires_grad or A.requires_grad:
                du = g2 @ B.data.T                                   # (N, r)
                du *= du.dtype.type(scale)
                if A.requires_grad:
                    A._accumulate(x2.T @ du)
                if x.requires_grad:
                    x._accumulate((du @ A.data.T).reshape(x.shape))
        out._backward = backward
    return out


class LoRALinear(Linear):
    """A Linear layer plus a trainable low-rank update: y = x W^T + b + (alpha / rank) (x A) B.

    Usually made from a pretrained layer with `LoRALinear.from_linear(linear, rank, alpha)`,
    which shares its weight and bias (and leaves their requires_grad as it is: freeze them
    first). A is initialised as the book does, uniform in +-1/sqrt(rank) (PyTorch's
    kaiming_uniform_(a=sqrt(5)) on an (in, rank) tensor, whose "fan-in" is rank); B is zero.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self._init_lora(rank, alpha)

    @classmethod
    def from_linear(cls, linear: Linear, rank: int, alpha: float) -> LoRALinear:
        layer = cls.__new__(cls)
        layer.weight = linear.weight   # the same Parameter objects: tied weights stay tied
        layer.bias = linear.bias
        layer.training = linear.training
        layer._init_lora(rank, alpha)
        return layer

    def _init_lora(self, rank: int, alpha: float) -> None:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        out_features, in_features = self.weight.shape
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        dtype = self.weight.dtype
        bound = 1.0 / math.sqrt(rank)
        u = backend.rng().random((in_features, rank))
        self.lora_A = Parameter((u * (2 * bound) - bound).astype(dtype, copy=False))
        self.lora_B = Parameter(backend.xp.zeros((rank, out_features), dtype=dtype))

    def forward(self, x):
        return super().forward(x) + low_rank_update(x, self.lora_A, self.lora_B, self.scale)

    def merged_weight(self):
        """W + s (A B)^T as an array, (out, in): the plain weight that computes the same y."""
        delta = (self.lora_A.data @ self.lora_B.data).T              # (out, in)
        return self.weight.data + delta * delta.dtype.type(self.scale)


def _replace(parent: Module, name: str, new: Module) -> None:
    setattr(parent, name, new)
    if isinstance(parent, ModuleList):  # it also keeps its items in a list
        parent._items[int(name)] = new


def apply_lora(module: Module, rank: int, alpha: float, include=None) -> Module:
    """Replace Linear layers below `module` by LoRALinear versions (the book's
    `replace_linear_with_lora`), in place; returns `module`.

    `include(name, layer) -> bool`, given each layer's dotted name (e.g. "blocks.0.attn.qkv"),
    picks which ones (default: all). Layers already adapted are left alone. A layer reached
    under two names is adapted once and the same LoRALinear is put in both places.
    Freeze the model before (`module.requires_grad_(False)`) to train only the updates.
    """
    names = _dotted_names(module)
    adapted = {}  # id(Linear) -> its LoRALinear
    for parent, attr, layer in _all_child_slots(module):
        if type(layer) is not Linear:  # (a LoRALinear is a Linear too: skip it)
            continue
        if id(layer) not in adapted:
            if include is not None and not include(names[id(layer)], layer):
                continue
            adapted[id(layer)] = LoRALinear.from_linear(layer, rank, alpha)
        _replace(parent, attr, adapted[id(layer)])
    return module


def merge_lora(module: Module) -> Module:
    """Fold every LoRALinear's update into its weight (W <- W + s (A B)^T) and put a plain Linear
    with that weight and the same bias in its place, in place; returns `module`. The outputs are
    unchanged (up to rounding) and inference pays nothing extra for the adaptation."""
    merged = {}  # id(LoRALinear) -> its plain Linear
    for parent, attr, layer in _all_child_slots(module):
        if not isinstance(layer, LoRALinear):
            continue
        if id(layer) not in merged:
            layer.weight.data = layer.merged_weight()
            plain = Linear.__new__(Linear)
            plain.weight, plain.bias, plain.training = layer.weight, layer.bias, layer.training
            merged[id(layer)] = plain
        _replace(parent, attr, merged[id(layer)])
    return module


def _all_child_slots(module: Module):
    """(parent, attribute name, child) for every place a submodule sits, shared ones included."""
    stack, seen = [module], set()
    while stack:
        parent = stack.pop()
        if id(parent) in seen:
            continue
        seen.add(id(parent))
        for name, child in list(parent.named_children()):
            yield parent, name, child
            stack.append(child)


def _dotted_names(module: Module) -> dict:
    """id(submodule) -> its first dotted name below `module` ("blocks.0.mlp.fc")."""
    names, stack = {}, [("", module)]
    while stack:
        prefix, parent = stack.pop()
        children = []
        for name, child in parent.named_children():
            if id(child) not in names:
                names[id(child)] = prefix + name
                children.append((prefix + name + ".", child))
        stack.extend(reversed(children))
    return names


__all__ = ["LoRALinear", "apply_lora", "low_rank_update", "merge_lora"]
