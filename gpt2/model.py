"""The GPT-2 model: embeddings, a stack of pre-LayerNorm transformer blocks, and an output head.

    ids (B, T) ──> tok_emb + pos_emb ──> dropout ──> blocks[0..L-1] ──> ln_f ──> head ──> logits (B, T, V)

    block(x) = x + attn(ln1(x))          each block reads the residual stream x (B, T, C) and
             + mlp(ln2(x + ...))         adds what it computed back into it

Names follow nanoGPT's spirit (`blocks[i].attn.qkv`, `blocks[i].mlp.fc`, `ln_f`); the mapping
to OpenAI's / Hugging Face's names lives in `gpt2/hf.py`.
"""

from __future__ import annotations

import math

import numpy as np

import minigrad as mg
from minigrad import backend, nn
from minigrad import functional as F
from minigrad.lora import apply_lora

from .config import GPTConfig, is_lora_target
from .errors import GPT2Error


class KVCache:
    """Keys and values of every layer for the tokens seen so far, for fast generation.

    Without a cache, generating token n+1 recomputes attention over all n previous tokens in every
    layer. With it, the prompt is run once ("prefill") and each later step feeds only the newest
    token: its query attends to the stored keys/values, and its own key/value are appended.

    Buffers are allocated once at full context length, (B, H, context_length, D) per layer, so an
    append is a copy into place rather than a growing concatenation.
    """

    def __init__(self, config: GPTConfig, batch_size: int, dtype=None):
        xp = backend.xp
        shape = (batch_size, config.n_heads, config.context_length, config.head_dim)
        dtype = dtype or backend.default_dtype
        self.keys = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [xp.zeros(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.capacity = config.context_length
        self.length = 0  # tokens stored (the same for every layer once a forward pass finishes)

    def reset(self) -> None:
        self.length = 0

    def append(self, layer: int, k, v):
        """Store k, v (B, H, T, D) after the first `length` positions; return all keys/values so far."""
        T = k.shape[2]
        end = self.length + T
        if end > self.capacity:
            raise GPT2Error(f"KV cache is full ({self.capacity} positions); crop the context")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees only itself and earlier positions."""

    def __init__(self, config: GPTConfig):
        C = config.emb_dim
        self.n_heads = config.n_heads
        self.dropout_p = config.dropout
        self.qkv = nn.Linear(C, 3 * C, bias=config.qkv_bias)  # queries, keys, values side by side
        self.proj = nn.Linear(C, C)                            # mixes the heads' outputs
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        H = self.n_heads
        D = C // H
        qkv = self.qkv(x)                                      # (B, T, 3C)
        # (B, T, 3C) -> (B, T, 3, H, D) -> (3, B, H, T, D): one reshape and one permute give all
        # three, each with heads as a batch axis, so attention is batched matmuls over (B, H).
        qkv = qkv.reshape(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                # each (B, H, T, D)
        if cache is not None:
            # Generation only (no_grad): attend over everything cached so far plus these T tokens.
            k_all, v_all = cache.append(layer, k.data, v.data)
            k, v = mg.Tensor(k_all), mg.Tensor(v_all)
        p = self.dropout_p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, causal=True, dropout_p=p)   # (B, H, T, D)
        y = y.permute(0, 2, 1, 3).reshape(B, T, C)             # heads side by side again
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: widen to 4C, GELU, project back to C."""

    def __init__(self, config: GPTConfig):
        C = config.emb_dim
        self.fc = nn.Linear(C, 4 * C)
        self.proj = nn.Linear(4 * C, C)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: normalise, transform, add back to the residual stream."""

    def __init__(self, config: GPTConfig):
        self.ln1 = nn.LayerNorm(config.emb_dim)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.emb_dim)
        self.mlp = MLP(config)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        x = x + self.attn(self.ln1(x), cache, layer)   # (B, T, C)
        x = x + self.mlp(self.ln2(x))                  # (B, T, C)
        return x


class GPTModel(nn.Module):
    def __init__(self, config: GPTConfig):
        if not isinstance(config, GPTConfig):
            raise GPT2Error(f"GPTModel needs a GPTConfig, got {type(config).__name__}")
        self.config = config
        C = config.emb_dim
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.pos_emb = nn.Embedding(config.context_length, C)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(C)
        if config.num_classes is not None:   # a classifier (gpt2/finetune/classify.py): K logits, with a bias
            self.head = nn.Linear(C, config.num_classes)
        else:   # with tied embeddings the head reuses tok_emb.weight (V, C): logits = x @ W_tok^T
            self.head = None if config.tie_embeddings else nn.Linear(C, config.vocab_size, bias=False)
        self._init_weights()
        if config.lora_rank is not None:   # an unmerged LoRA fine-tune: its layers, to load its A and B into
            apply_lora(self, config.lora_rank, config.lora_alpha,
                       include=lambda name, layer: is_lora_target(name, config.lora_targets))

    def _init_weights(self) -> None:
        """GPT-2's initialisation: every weight matrix and embedding normal(0, 0.02), biases zero,
        LayerNorm scale one; the two projections that write into the residual stream in each
        block get std 0.02 / sqrt(2 * n_layers), so the stream's variance does not grow with depth
        (each block adds two contributions)."""
        rng = backend.rng()
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.data = backend.xp.zeros(p.shape, dtype=backend.default_dtype)
            elif name.startswith("ln") or ".ln" in name:
                p.data = backend.xp.ones(p.shape, dtype=backend.default_dtype)
            else:
                writes_residual = name.endswith(("attn.proj.weight", "mlp.proj.weight"))
                std = resid_std if writes_residual else 0.02
                p.data = rng.normal(p.shape, std=std)

    def new_cache(self, batch_size: int) -> KVCache:
        return KVCache(self.config, batch_size, dtype=self.tok_emb.weight.dtype)

    def forward(self, ids, cache: KVCache | None = None, last_only: bool = False):
        """ids: integer array (B, T) -> logits Tensor (B, T, vocab_size).

        With a `cache`, the ids are the tokens that follow the cached ones: positions continue
        from `cache.length`, and the cache grows by T. With `last_only`, the final layer norm and
        the output head run for the last position only, giving logits (B, 1, vocab_size): all
        that generation samples from. (The head is the largest matmul of GPT-2 124M, 768 x
        50,257 per position; for a 100-token context it is 100x less work.)
        """
        ids = _check_ids(ids, self.config)
        B, T = ids.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.context_length:
            raise GPT2Error(f"sequence of {start + T} tokens is longer than the model's context length "
                            f"{self.config.context_length}; crop it to the last {self.config.context_length}")
        pos = backend.xp.arange(start, start + T)
        x = self.tok_emb(ids) + self.pos_emb(pos)      # (B, T, C) + (T, C) broadcasts over B
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:, :]                           # (B, 1, C): layer norm is per position
        x = self.ln_f(x)
        if self.head is not None:  # called as a module, so a replaced head (a classifier with a
            return self.head(x)    # bias, a LoRALinear) runs its own forward: (B, T, V)
        return F.linear(x, self.tok_emb.weight)        # tied: logits = x W_tok^T, (B, T, V)


def build_uninitialised(config: GPTConfig, dtype=None) -> GPTModel:
    """GPTModel(config) whose parameters are placeholders, to be replaced at once by loaded
    weights (`load_state_dict` or assigning `.data`). No random draws (for GPT-2 XL, 1.5 billion
    of them), and never two copies of the weights. `dtype` sets the parameters' dtype (default:
    minigrad's default dtype)."""
    previous = backend.get_default_dtype()
    try:
        if dtype is not None:
            backend.set_default_dtype(dtype)
        with backend.no_init():
            return GPTModel(config)
    finally:
        backend.set_default_dtype(previous)


def _check_ids(ids, config: GPTConfig):
    if isinstance(ids, mg.Tensor):
        ids = ids.data
    ids = backend.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise GPT2Error(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise GPT2Error(f"token ids must have shape (batch, time) with time >= 1, got {tuple(ids.shape)}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= config.vocab_size:
        raise GPT2Error(f"token id {hi if hi >= config.vocab_size else lo} is outside the vocabulary "
                        f"[0, {config.vocab_size})")
    return ids


def model_memory_bytes(config: GPTConfig, dtype=np.float32) -> int:
    """Bytes the parameters take (without gradients or optimizer state, which add 3x for AdamW)."""
    return config.num_parameters() * np.dtype(dtype).itemsize


# ---------------------------------------------------------------------------------------------
# Other initialisations (GPT-2's own is GPTModel._init_weights)
# ---------------------------------------------------------------------------------------------

INITS = ("book", "gpt2")


def pytorch_default_init_(model) -> None:
    """Re-draw every parameter as PyTorch's default layers would, in place: *LLMs from Scratch*'s
    GPTModel has no init of its own, so this is the book's starting point.

        Linear weight and bias   uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))
        Embedding                normal(0, 1)
        LayerNorm                scale 1, shift 0

    Why the course run uses it rather than GPT-2's normal(0, 0.02) (GPTModel's default): the
    course trains 90 steps at a constant lr of 4e-4 with an untied head. From GPT-2's tiny
    embeddings that run stalls at a loss of about 6, predicting only frequent tokens; from
    unit-variance embeddings it memorises the story (train loss < 1) as the book shows.
    PyTorch from the same weights on the same batches, dropout off, gives the same losses to
    within 1e-5 over 30 steps (`benchmarks/same_run.py`). GPT-2's init is the
    better default for long runs with warmup (nanoGPT's recipe), and the one to use with a tied
    head (unit-variance embeddings as output weights give huge initial logits).

    Draws from minigrad's seeded generator, so `mg.manual_seed` makes it reproducible.
    """
    rng = backend.rng()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.weight.shape[1])
            for p in (m.weight, m.bias):
                if p is not None:
                    p.data = ((rng.random(p.shape) * 2.0 - 1.0) * bound).astype(p.dtype, copy=False)
        elif isinstance(m, nn.Embedding):
            m.weight.data = rng.normal(m.weight.shape, std=1.0, dtype=m.weight.dtype)
        elif isinstance(m, nn.LayerNorm):
            m.weight.data = backend.xp.ones(m.weight.shape, dtype=m.weight.dtype)
            if m.bias is not None:
                m.bias.data = backend.xp.zeros(m.bias.shape, dtype=m.bias.dtype)


def init_model_(model, init: str) -> None:
    """Apply a named initialisation: "gpt2" (GPTModel's own, nothing to do) or "book"."""
    if init == "book":
        pytorch_default_init_(model)
    elif init != "gpt2":
        raise GPT2Error(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
