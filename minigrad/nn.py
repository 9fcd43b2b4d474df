"""Layers: small objects that own parameters and call the functional ops.

A `Module` finds its parameters by looking at its own attributes: a `Parameter` is a leaf, a
`Module` (or a `ModuleList` of them) is searched recursively. Names are dotted paths in the
order the attributes were set, e.g. `blocks.0.attn.qkv.weight`, and are the keys of
`state_dict()`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from . import backend
from . import functional as F
from .tensor import Tensor


class Parameter(Tensor):
    """A tensor that a module learns: requires_grad, and found by `Module.parameters()`."""

    def __init__(self, data, dtype=None):
        super().__init__(data, requires_grad=True, dtype=dtype)


class Module:
    training: bool = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} must define forward()")

    # -- parameters --------------------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """Every parameter with its dotted name; a parameter shared by two modules is listed once."""
        seen = set()
        stack = [(prefix, self)]
        while stack:
            pre, module = stack.pop()
            children = []
            for name, value in vars(module).items():
                if isinstance(value, Parameter) and id(value) not in seen:
                    seen.add(id(value))
                    yield pre + name, value
                elif isinstance(value, Module):
                    children.append((pre + name + ".", value))
            stack.extend(reversed(children))  # depth-first, in attribute order

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self, trainable_only: bool = False) -> int:
        params = self.trainable_parameters() if trainable_only else self.parameters()
        return sum(p.size for p in params)

    # -- freezing (fine-tuning trains a few parameters and keeps the rest fixed) -------------------
    def named_trainable_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """The parameters with requires_grad=True, as `named_parameters`."""
        return ((n, p) for n, p in self.named_parameters(prefix) if p.requires_grad)

    def trainable_parameters(self) -> list[Parameter]:
        """What to hand the optimizer after freezing: `AdamW(model.trainable_parameters())`."""
        return [p for _, p in self.named_trainable_parameters()]

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        """Freeze (False) or unfreeze (True) every parameter of this module and its submodules.

        The book's recipe for classification, in this API:
            model.requires_grad_(False)                  # freeze everything ...
            model.blocks[-1].requires_grad_(True)        # ... then unfreeze the last block,
            model.ln_f.requires_grad_(True)              # the final norm (and the new head)
        Frozen parameters get no .grad, so backward spends no time or memory on them.
        """
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def modules(self) -> Iterator[Module]:
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    # -- modes ---------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        """Training mode turns dropout on; `eval()` turns it off. Applies to every submodule."""
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    # -- saving and loading ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Parameter name -> array (of the current backend). The arrays are the live ones."""
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into the parameters, checking names and shapes first.

        Arrays may come from NumPy or CuPy; they are converted to this module's backend and each
        parameter's dtype. Nothing is changed unless every check passes.
        """
        params = dict(self.named_parameters())
        missing = [n for n in params if n not in state]
        unexpected = [n for n in state if n not in params]
        if strict and (missing or unexpected):
            def few(names):
                return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
            parts = ([f"missing {few(missing)}"] if missing else []) + \
                ([f"unexpected {few(unexpected)}"] if unexpected else [])
            raise KeyError("state dict does not match the model: " + "; ".join(parts))
        for name, p in params.items():
            if name in state and tuple(state[name].shape) != p.shape:
                raise ValueError(f"shape mismatch for {name}: model has {p.shape}, "
                                 f"state dict has {tuple(state[name].shape)}")
        for name, p in params.items():
            if name in state:
                p.data = backend.asarray(state[name], dtype=p.dtype).copy()

    def to(self, dtype=None) -> Module:
        """Move every parameter to the current backend (after `set_backend`) and optionally cast
        it, e.g. `model.to(np.float64)` for a whole-model gradient check."""
        for p in self.parameters():
            p.data = backend.asarray(p.data, dtype=dtype or p.dtype)
            p.grad = None
        return self


class ModuleList(Module):
    """A list of modules whose parameters are named `0.`, `1.`, ..."""

    def __init__(self, modules=()):
        self._items: list[Module] = []
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> None:
        setattr(self, str(len(self._items)), module)
        self._items.append(module)

    def __getitem__(self, i):
        return self._items[i]

    def __len__(self):
        return len(self._items)

    def __iter__(self):
        return iter(self._items)

    def named_children(self):
        for i, m in enumerate(self._items):
            yield str(i), m


class Sequential(ModuleList):
    """Modules applied one after another."""

    def __init__(self, *modules):
        super().__init__(modules)

    def forward(self, x):
        for m in self:
            x = m(x)
        return x


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

class Linear(Module):
    """y = x W^T + b with W of shape (out_features, in_features), as in PyTorch.

    Default initialisation is PyTorch's (uniform in +-1/sqrt(in_features)); GPT-2 re-initialises
    its own layers with normal(0, 0.02).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        bound = 1.0 / math.sqrt(in_features)
        self.weight = Parameter(_uniform((out_features, in_features), bound))
        self.bias = Parameter(_uniform((out_features,), bound)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Embedding(Module):
    """A (num_embeddings, dim) table; `emb(ids)` looks rows up. Initialised normal(0, 1)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        self.weight = Parameter(backend.rng().normal((num_embeddings, embedding_dim)))

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class LayerNorm(Module):
    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        self.eps = eps
        self.weight = Parameter(backend.xp.ones(dim, dtype=backend.default_dtype))
        self.bias = Parameter(backend.xp.zeros(dim, dtype=backend.default_dtype)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)


class Dropout(Module):
    def __init__(self, p: float = 0.1):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)


class GELU(Module):
    def forward(self, x):
        return F.gelu(x)


class ReLU(Module):
    def forward(self, x):
        return x.relu()


class Tanh(Module):
    def forward(self, x):
        return x.tanh()


def freeze(module: Module) -> Module:
    """`module.requires_grad_(False)`: a frozen module still runs forward and passes gradients
    through to its inputs; it only stops learning."""
    return module.requires_grad_(False)


def unfreeze(module: Module) -> Module:
    return module.requires_grad_(True)


def _uniform(shape, bound):
    u = backend.rng().random(shape)
    return (u * (2 * bound) - bound).astype(backend.default_dtype, copy=False)


__all__ = ["Parameter", "Module", "ModuleList", "Sequential", "Linear", "Embedding", "LayerNorm",
           "Dropout", "GELU", "ReLU", "Tanh", "freeze", "unfreeze"]
