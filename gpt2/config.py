"""Model configuration: `GPTConfig` and the four GPT-2 sizes OpenAI released.

    cfg = gpt2_124m(context_length=256, dropout=0.1, qkv_bias=False, tie_embeddings=False)

The course run (chapter 05) uses exactly that: the 124M shape, as *LLMs from Scratch* trains it.

A fine-tuned model says what it became (gpt2/finetune), so that its checkpoint rebuilds it:
`num_classes` (a classifier: the output head is Linear(emb_dim, num_classes) with a bias, in
place of the language-model head) and `lora_rank`, `lora_alpha`, `lora_targets` (the Linear
layers that carry an unmerged LoRA update, minigrad/lora.py). All default to a plain GPT-2 and
are left out of `to_dict()` at their defaults, so older config.json files read the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from .errors import GPT2Error


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257      # GPT-2's BPE vocabulary (50,000 merges + 256 bytes + <|endoftext|>)
    context_length: int = 1024   # the longest sequence the position embedding covers
    emb_dim: int = 768           # C: the width of the residual stream
    n_heads: int = 12            # H: attention heads; each has head size D = C / H
    n_layers: int = 12           # transformer blocks
    dropout: float = 0.0         # on embeddings, attention weights and each residual branch
    qkv_bias: bool = True        # biases on the query/key/value projection (GPT-2 has them)
    tie_embeddings: bool = True  # output head shares the token embedding matrix (GPT-2 does)
    num_classes: int | None = None       # a classifier's classes (head: Linear(C, K) + bias); None: LM head
    lora_rank: int | None = None         # LoRA's rank r on the `lora_targets` layers; None: no LoRA
    lora_alpha: float | None = None      # LoRA's alpha (the update is scaled by alpha / r)
    lora_targets: tuple = ()             # which Linear layers carry LoRA (names in LORA_TARGETS)

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise GPT2Error(f"{name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads:
            raise GPT2Error(f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise GPT2Error(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        for name in ("qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise GPT2Error(f"{name} must be True or False, got {getattr(self, name)!r}")
        k = self.num_classes
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 2):
            raise GPT2Error(f"num_classes must be an integer >= 2 (or None for a language model), got {k!r}")
        self._check_lora()

    def _check_lora(self) -> None:
        r, alpha, targets = self.lora_rank, self.lora_alpha, self.lora_targets
        if isinstance(targets, list):
            object.__setattr__(self, "lora_targets", targets := tuple(targets))
        if r is None:
            if alpha is not None or targets:
                raise GPT2Error("lora_alpha and lora_targets need a lora_rank")
            return
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise GPT2Error(f"lora_rank must be a positive integer (or None for no LoRA), got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
                or alpha <= 0:
            raise GPT2Error(f"lora_alpha must be a number > 0 with a lora_rank, got {alpha!r}")
        if not isinstance(targets, tuple) or not targets or \
                any(t not in LORA_TARGETS for t in targets) or len(set(targets)) != len(targets):
            raise GPT2Error(f"lora_targets must be a list of distinct layer names from "
                            f"{', '.join(LORA_TARGETS)}, got {str(targets)[:60]}")
        if "head" in targets and not self.has_head_layer:
            raise GPT2Error("lora_targets names the head, but a tied language-model head is the token "
                            "embedding, not a Linear layer")

    @property
    def has_head_layer(self) -> bool:
        """Whether the output head is a Linear layer of its own (untied, or a classifier)."""
        return self.num_classes is not None or not self.tie_embeddings

    @property
    def head_size(self) -> int:
        """The head's outputs: the classes of a classifier, else the vocabulary."""
        return self.num_classes if self.num_classes is not None else self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    def replace(self, **overrides) -> GPTConfig:
        """A copy with some fields changed (unknown names are an error)."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise GPT2Error(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **overrides)

    def num_parameters(self) -> int:
        """Exact parameter count, computed from the shapes (nothing is allocated)."""
        V, T, C, L = self.vocab_size, self.context_length, self.emb_dim, self.n_layers
        per_block = (
            2 * C                                            # ln1 weight + bias
            + 3 * C * C + (3 * C if self.qkv_bias else 0)    # qkv projection
            + C * C + C                                      # attention output projection
            + 2 * C                                          # ln2
            + 4 * C * C + 4 * C                              # mlp fc (C -> 4C)
            + 4 * C * C + C                                  # mlp proj (4C -> C)
        )
        if self.num_classes is not None:
            head = C * self.num_classes + self.num_classes   # a classifier: weight and bias
        else:
            head = 0 if self.tie_embeddings else V * C
        return V * C + T * C + L * per_block + 2 * C + head + self.lora_parameters()

    def lora_parameters(self) -> int:
        """LoRA's A (in, r) and B (r, out) of every adapted layer: r (in + out) each."""
        if self.lora_rank is None:
            return 0
        C = self.emb_dim
        sizes = {"attn.qkv": (C, 3 * C), "attn.proj": (C, C), "mlp.fc": (C, 4 * C), "mlp.proj": (4 * C, C)}
        per_block = sum(i + o for t, (i, o) in sizes.items() if t in self.lora_targets)
        head = C + self.head_size if "head" in self.lora_targets else 0
        return self.lora_rank * (self.n_layers * per_block + head)

    def to_dict(self) -> dict:
        """The fields, leaving out the fine-tuning ones at their defaults (a plain GPT-2's
        config.json is as it always was)."""
        d = dataclasses.asdict(self)
        for name in _FINETUNE_FIELDS:
            if d[name] in (None, ()):
                del d[name]
        if "lora_targets" in d:
            d["lora_targets"] = list(d["lora_targets"])   # (JSON has lists)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        if not isinstance(d, dict):
            raise GPT2Error("model config must be a JSON object")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise GPT2Error(f"model config has unknown field(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# The Linear layers LoRA may adapt, by the end of their dotted names: the four of every block
# ("blocks.3.attn.qkv" ends with "attn.qkv") and the output head.
LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "head")
_FINETUNE_FIELDS = ("num_classes", "lora_rank", "lora_alpha", "lora_targets")


def is_lora_target(name: str, targets) -> bool:
    """Whether the layer at dotted `name` (e.g. "blocks.0.mlp.fc") is one of `targets`."""
    return any(name == t or name.endswith("." + t) for t in targets)


def gpt2_124m(**overrides) -> GPTConfig:
    """GPT-2 small: 12 layers, 12 heads, 768 wide; 124,439,808 parameters."""
    return GPTConfig(n_layers=12, n_heads=12, emb_dim=768).replace(**overrides)


def gpt2_medium(**overrides) -> GPTConfig:
    """GPT-2 medium: 24 layers, 16 heads, 1024 wide; 354,823,168 parameters."""
    return GPTConfig(n_layers=24, n_heads=16, emb_dim=1024).replace(**overrides)


def gpt2_large(**overrides) -> GPTConfig:
    """GPT-2 large: 36 layers, 20 heads, 1280 wide; 774,030,080 parameters."""
    return GPTConfig(n_layers=36, n_heads=20, emb_dim=1280).replace(**overrides)


def gpt2_xlarge(**overrides) -> GPTConfig:
    """GPT-2 XL: 48 layers, 25 heads, 1600 wide; 1,557,611,200 parameters."""
    return GPTConfig(n_layers=48, n_heads=25, emb_dim=1600).replace(**overrides)


# CLI names (`--model`) -> config functions. The names match Hugging Face's, with 124m for "gpt2".
MODEL_SIZES = {
    "gpt2-124m": gpt2_124m,
    "gpt2-medium": gpt2_medium,
    "gpt2-large": gpt2_large,
    "gpt2-xl": gpt2_xlarge,
}


def config_for(name: str, **overrides) -> GPTConfig:
    if name not in MODEL_SIZES:
        raise GPT2Error(f"unknown model size {name!r}; choose one of {', '.join(MODEL_SIZES)}")
    return MODEL_SIZES[name](**overrides)


# The course run's model (chapter 05, and the defaults of `train`, `bench` and `selftest`): GPT-2
# 124M's shape with these settings, as *LLMs from Scratch* trains it.
COURSE = dict(context_length=256, dropout=0.1, qkv_bias=False, tie_embeddings=False)


def course_config(**overrides) -> GPTConfig:
    """The course run's model: 124M shape, context 256, dropout 0.1, no qkv bias, untied head."""
    return gpt2_124m(**{**COURSE, **overrides})
