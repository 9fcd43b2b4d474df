"""Getting a model ready to fine-tune, in ways its checkpoint records so that it reloads as it was.

    set_dropout(model, 0.0)                         # the book fine-tunes without dropout
    add_lora(model, rank=16, alpha=16)              # LoRA on every Linear layer of the blocks
    freeze(model, "lora")                           # what trains: all | last-block | lora
    reference = frozen_copy(model)                  # DPO's reference: the same weights, no graph
    tokenizer = with_template(tokenizer, "alpaca")  # tokenizer.json names the prompt template
    merge_lora_into(model)                          # W += (alpha / r) (A B)^T: a plain GPT-2 again

The model's config says what it became (gpt2/config.py): `num_classes` for a classifier head
(classify.add_classifier_head), `lora_rank`, `lora_alpha` and `lora_targets` for an unmerged
LoRA. save_checkpoint writes that config, and load_model builds the same layers before loading
the weights, so a checkpoint taken in the middle of a LoRA run resumes exactly. What is frozen
is not part of the model: a run records it (`trainable`) and freezes again when it resumes.
"""

from __future__ import annotations

import hashlib

import numpy as np

from minigrad import backend, nn
from minigrad.lora import LoRALinear, apply_lora, merge_lora

from ..config import LORA_TARGETS, is_lora_target
from ..errors import GPT2Error
from ..model import CausalSelfAttention, build_uninitialised

TRAINABLE = ("all", "last-block", "lora")
BLOCK_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")   # every Linear layer of a block


def lora_targets(spec, config) -> tuple[str, ...]:
    """The layer names LoRA adapts: "blocks" (the four Linear layers of every block), "all" (those
    and the output head, where it is a Linear layer: the book's appendix E), or names from
    LORA_TARGETS, as a list or comma-separated."""
    if spec in ("blocks", None):
        return BLOCK_TARGETS
    if spec == "all":
        return BLOCK_TARGETS + (("head",) if config.has_head_layer else ())
    names = tuple(n.strip() for n in spec.split(",")) if isinstance(spec, str) else tuple(spec)
    unknown = [n for n in names if n not in LORA_TARGETS]
    if unknown or not names:
        raise GPT2Error(f"unknown LoRA target(s) {', '.join(unknown) or repr(spec)}: use blocks, all, or "
                        f"a comma-separated list of {', '.join(LORA_TARGETS)}")
    return tuple(dict.fromkeys(names))


def set_dropout(model, p: float) -> None:
    """Set every dropout of the model to `p` (embeddings, attention weights, residual branches)
    and record it in the config."""
    config = model.config.replace(dropout=p)   # (checks p)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(m, CausalSelfAttention):
            m.dropout_p = p
    model.config = config


def add_lora(model, rank: int, alpha: float, targets="blocks") -> None:
    """LoRA (minigrad/lora.py) on the `targets` layers (see lora_targets), recorded in the
    config. Freeze afterwards (`freeze(model, "lora")`) to train only the updates."""
    if model.config.lora_rank is not None:
        raise GPT2Error("the model already carries LoRA; merge it first (merge_lora_into)")
    names = lora_targets(targets, model.config)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise GPT2Error(f"LoRA's alpha must be a number > 0, got {alpha!r}")
    config = model.config.replace(lora_rank=rank, lora_alpha=float(alpha), lora_targets=names)   # (checks)
    apply_lora(model, rank, float(alpha), include=lambda name, layer: is_lora_target(name, names))
    model.config = config


def merge_lora_into(model) -> None:
    """Fold every LoRA update into its weight (plain Linear layers again) and clear LoRA from the
    config; the model computes the same (to rounding). Nothing to do without LoRA."""
    if model.config.lora_rank is None:
        return
    merge_lora(model)
    model.config = model.config.replace(lora_rank=None, lora_alpha=None, lora_targets=())


def freeze(model, trainable: str) -> None:
    """Choose what trains, freezing the rest:
    * "all": every parameter;
    * "last-block": the last transformer block, the final layer norm and the output head if it
      is a layer of its own (the book's chapter 6);
    * "lora": only the LoRA updates, and a classifier head that carries none (it is new, so
      there is nothing pretrained in it to keep).
    """
    if trainable not in TRAINABLE:
        raise GPT2Error(f"unknown choice of what to train {trainable!r}; choose one of "
                        f"{', '.join(TRAINABLE)}")
    if trainable == "all":
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    if trainable == "last-block":
        for module in (model.blocks[len(model.blocks) - 1], model.ln_f, model.head):
            if module is not None:
                module.requires_grad_(True)
        return
    if model.config.lora_rank is None:
        raise GPT2Error("trainable 'lora' needs a model with LoRA layers (add_lora)")
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
    if model.config.num_classes is not None and not isinstance(model.head, LoRALinear):
        model.head.requires_grad_(True)


def frozen_copy(model):
    """A copy of `model` with its own weights (the same values), frozen and in eval mode: DPO's
    reference, whose forward passes build no graph."""
    copy = build_uninitialised(model.config, model.tok_emb.weight.dtype)
    copy.load_state_dict(model.state_dict())
    copy.requires_grad_(False)
    copy.eval()
    return copy


def weights_sha256(model) -> str:
    """The SHA-256 of a model's weights (names, shapes and bytes, in order): tells whether a
    reloaded source model is the one a run started from."""
    digest = hashlib.sha256()
    for name, array in model.state_dict().items():
        host = np.ascontiguousarray(backend.to_numpy(array))
        digest.update(f"{name}:{host.dtype}:{host.shape};".encode())
        digest.update(host.tobytes())
    return digest.hexdigest()


class TemplatedTokenizer:
    """A tokenizer whose record (`to_dict()`, a checkpoint's tokenizer.json) also names the prompt
    template the model was fine-tuned with, e.g. {"type": "gpt2", "prompt_template": "alpaca"}:
    `chat` and `generate` then prompt it that way. Everything else is the wrapped tokenizer's."""

    def __init__(self, tokenizer, template: str):
        self.tokenizer, self.template = tokenizer, template

    def to_dict(self) -> dict:
        return {**self.tokenizer.to_dict(), "prompt_template": self.template}

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def with_template(tokenizer, template: str | None):
    """`tokenizer`, recording `template` in its checkpoints (None: as it is)."""
    if template is None:
        return tokenizer
    if isinstance(tokenizer, TemplatedTokenizer):
        tokenizer = tokenizer.tokenizer
    return TemplatedTokenizer(tokenizer, template)
