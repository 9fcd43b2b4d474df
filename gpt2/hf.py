"""The Hugging Face / OpenAI layout of GPT-2 and how it maps onto ours: names, shapes, config.

One module, used in both directions: `gpt2.pretrained.load_pretrained` imports OpenAI's weights
through it, and `gpt2.pretrained.export_hf` writes our models through it in a form that
transformers loads as a `GPT2LMHeadModel`.

Tensor names (HF `GPT2LMHeadModel` -> ours), for every block i:

    transformer.wte.weight              (V, C)   -> tok_emb.weight           (V, C)
    transformer.wpe.weight              (T, C)   -> pos_emb.weight           (T, C)
    transformer.h.i.ln_1.weight / bias  (C,)     -> blocks.i.ln1.weight / bias
    transformer.h.i.attn.c_attn.weight  (C, 3C)  -> blocks.i.attn.qkv.weight (3C, C)  transposed
    transformer.h.i.attn.c_attn.bias    (3C,)    -> blocks.i.attn.qkv.bias   (3C,)
    transformer.h.i.attn.c_proj.weight  (C, C)   -> blocks.i.attn.proj.weight (C, C)  transposed
    transformer.h.i.attn.c_proj.bias    (C,)     -> blocks.i.attn.proj.bias
    transformer.h.i.ln_2.weight / bias  (C,)     -> blocks.i.ln2.weight / bias
    transformer.h.i.mlp.c_fc.weight     (C, 4C)  -> blocks.i.mlp.fc.weight   (4C, C)  transposed
    transformer.h.i.mlp.c_fc.bias       (4C,)    -> blocks.i.mlp.fc.bias
    transformer.h.i.mlp.c_proj.weight   (4C, C)  -> blocks.i.mlp.proj.weight (C, 4C)  transposed
    transformer.h.i.mlp.c_proj.bias     (C,)     -> blocks.i.mlp.proj.bias
    transformer.ln_f.weight / bias      (C,)     -> ln_f.weight / bias
    lm_head.weight                      (V, C)   -> head.weight (V, C), only for an untied head

Why the transposes: OpenAI wrote GPT-2 in TensorFlow, and Hugging Face kept its layout in a
`Conv1D` module that computes y = x @ W + b with W stored [in, out]. Our `nn.Linear` stores W as
[out, in] and computes x @ W.T, as PyTorch's does. c_attn's 3C outputs are q, k and v side by
side, the same order as our qkv, so a plain transpose is all it takes.

Details of the files found in the wild:
  * The `transformer.` prefix is optional: OpenAI's own hub files (openai-community/gpt2) say
    `h.0.attn.c_attn.weight` and `wte.weight`; transformers' `save_pretrained` writes the prefix.
    We read both and write the prefix.
  * Older files also store each layer's causal-mask buffers, `h.i.attn.bias` and
    `h.i.attn.masked_bias`. They are not weights; we skip them. (Careful: `attn.bias` is that
    mask, `attn.c_attn.bias` is the real qkv bias.)
  * `lm_head.weight` is usually absent because GPT-2 ties it to wte. If present while the config
    ties the embeddings, it is ignored, as transformers does.

Our model's options that Hugging Face's GPT-2 lacks, and what export does with them:
  * qkv_bias=False: HF's c_attn always has a bias, so export writes zeros (the same function).
    It also writes `"minigrad_qkv_bias": false` into config.json (transformers keeps unknown
    fields and ignores them), so that loading the export back gives a model without qkv bias.
  * An untied output head: export writes `lm_head.weight` and `"tie_word_embeddings": false`;
    transformers' GPT2LMHeadModel then keeps a separate head, as it does for any config with
    tie_word_embeddings=false, and we load such files back as an untied model.
  * One dropout rate: export writes it as all three of HF's (embd_pdrop, attn_pdrop, resid_pdrop);
    import takes resid_pdrop (they are equal in every OpenAI config). Dropout only matters when
    training; generation runs in eval mode.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from .config import GPTConfig
from .errors import GPT2Error

PREFIX = "transformer."
HEAD = "lm_head.weight"

# Per-block tensors: (our name suffix, HF name suffix, transposed?). "{i}" is the layer index.
# Each layer has a weight and a bias; the linear layers' weights are Conv1D's [in, out] in HF.
BLOCK_NAMES = [(f"{ours}.{p}", f"{theirs}.{p}", linear and p == "weight")
               for ours, theirs, linear in [("ln1", "ln_1", False), ("attn.qkv", "attn.c_attn", True),
                                            ("attn.proj", "attn.c_proj", True), ("ln2", "ln_2", False),
                                            ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True)]
               for p in ("weight", "bias")]
TOP_NAMES = [
    ("tok_emb.weight", "wte.weight", False),
    ("pos_emb.weight", "wpe.weight", False),
    ("ln_f.weight", "ln_f.weight", False),
    ("ln_f.bias", "ln_f.bias", False),
]
# Buffers some files carry that are not parameters (the causal mask and its fill value).
IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")

# Activation names transformers uses for GPT-2's tanh approximation of GELU (the same formula).
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the mapping: our name, the HF name (without prefix), the shape the HF file
    stores, and whether it is transposed between the two layouts."""
    ours: str
    hf: str
    hf_shape: tuple
    transpose: bool

    @property
    def our_shape(self) -> tuple:
        return self.hf_shape[::-1] if self.transpose else self.hf_shape


def tensor_specs(config: GPTConfig) -> list[TensorSpec]:
    """Every tensor of a GPT2LMHeadModel with this config, in file order, with its HF shape.

    The qkv bias is always listed (HF always has it); the head only for an untied model."""
    V, T, C = config.vocab_size, config.context_length, config.emb_dim
    hf_shapes = {
        "wte.weight": (V, C), "wpe.weight": (T, C), "ln_f.weight": (C,), "ln_f.bias": (C,),
        "ln_1.weight": (C,), "ln_1.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
        "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
        "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
        "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,),
        "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,),
    }
    specs = [TensorSpec(o, h, hf_shapes[h], t) for o, h, t in TOP_NAMES[:2]]
    for i in range(config.n_layers):
        specs += [TensorSpec(f"blocks.{i}.{o}", f"h.{i}.{h}", hf_shapes[h], t) for o, h, t in BLOCK_NAMES]
    specs += [TensorSpec(o, h, hf_shapes[h], t) for o, h, t in TOP_NAMES[2:]]
    if not config.tie_embeddings:
        specs.append(TensorSpec("head.weight", HEAD, (V, C), False))
    return specs


def strip_prefix(name: str) -> str:
    """`transformer.h.0.ln_1.weight` -> `h.0.ln_1.weight`; other names unchanged."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def hf_file_name(spec: TensorSpec) -> str:
    """The name we write into exported files (transformers' save_pretrained style)."""
    return spec.hf if spec.hf == HEAD else PREFIX + spec.hf


def to_ours(array, spec: TensorSpec):
    """An HF tensor -> our layout (a contiguous copy when transposed)."""
    return np.ascontiguousarray(array.T) if spec.transpose else array


def to_hf(array, spec: TensorSpec):
    """One of our tensors -> the HF layout, as a contiguous array."""
    return np.ascontiguousarray(array.T if spec.transpose else array)


# ---------------------------------------------------------------------------------------------
# Matching the tensors of a file against a config
# ---------------------------------------------------------------------------------------------

def match_tensors(file_shapes: dict, config: GPTConfig, source: str = "the weights file") -> dict:
    """Check a file's tensors against what `config` needs; return {spec.ours: (spec, file name)}.

    `file_shapes` maps the names in the file to their shapes. Accepts names with or without the
    `transformer.` prefix, skips the attention-mask buffers, and ignores `lm_head.weight` when the
    head is tied. Any missing, unexpected or wrongly shaped tensor is a GPT2Error that names it
    (and, where the config and the tensors disagree, the config field).
    """
    by_hf: dict[str, str] = {}
    for name in file_shapes:
        key = strip_prefix(name)
        if key in by_hf:
            raise GPT2Error(f"{source} has both {by_hf[key]!r} and {name!r} (the same tensor twice)")
        by_hf[key] = name
    style = PREFIX if any(n.startswith(PREFIX) for n in file_shapes) else ""
    specs = tensor_specs(config)
    needed = {s.hf for s in specs}
    unexpected = [by_hf[k] for k in by_hf
                  if k not in needed and not IGNORED.match(k) and not (k == HEAD and config.tie_embeddings)]
    if unexpected:
        layer = re.match(r"^h\.(\d+)\.", strip_prefix(unexpected[0]))
        hint = (f" (config.json says n_layer={config.n_layers}; the file has more layers: config "
                "and weights disagree)" if layer and int(layer.group(1)) >= config.n_layers else "")
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise GPT2Error(f"unexpected tensor {unexpected[0]!r}{more} in {source}{hint}; "
                        "is this a GPT-2 (GPT2LMHeadModel) checkpoint?")
    matched = {}
    for spec in specs:
        if spec.hf not in by_hf:
            what = {"lm_head.weight": " (config.json sets tie_word_embeddings=false, so the untied "
                                      "output head must be in the file)"}.get(spec.hf, "")
            if not what and spec.hf.startswith("h."):
                what = f" (config.json says n_layer={config.n_layers})"
            missing = spec.hf if spec.hf == HEAD else style + spec.hf
            raise GPT2Error(f"missing tensor {missing!r} in {source}{what}")
        name = by_hf[spec.hf]
        shape = tuple(int(n) for n in file_shapes[name])
        if shape != spec.hf_shape:
            raise GPT2Error(f"tensor {name!r} in {source} has shape {shape}, but config.json "
                            f"({_config_summary(config)}) needs {spec.hf_shape}: config and weights "
                            "disagree, or the file is not this model's")
        matched[spec.ours] = (spec, name)
    return matched


def _config_summary(config: GPTConfig) -> str:
    return (f"vocab_size={config.vocab_size}, n_positions={config.context_length}, "
            f"n_embd={config.emb_dim}, n_layer={config.n_layers}")


# ---------------------------------------------------------------------------------------------
# config.json <-> GPTConfig
# ---------------------------------------------------------------------------------------------

def config_from_hf(d: dict, source: str = "config.json") -> tuple[GPTConfig, float]:
    """A transformers GPT2Config dict -> (GPTConfig, layer_norm_epsilon).

    Rejects, with a GPT2Error naming the field, anything that would make our model compute a
    different function: another model type or activation, an MLP width other than 4C, scaled or
    unscaled attention variants GPT-2 does not use, cross-attention.
    """
    if not isinstance(d, dict):
        raise GPT2Error(f"{source} must be a JSON object")

    def get(*names, default=None):
        for n in names:
            if n in d and d[n] is not None:
                return d[n]
        return default

    if "emb_dim" in d and "n_embd" not in d:
        raise GPT2Error(f"{source} is a checkpoint written by `python -m gpt2 train` (our own names), not "
                        "the Hugging Face layout: load it with --checkpoint DIR (gpt2.checkpoint.load_model)")
    model_type = get("model_type", default="gpt2")
    if model_type != "gpt2":
        raise GPT2Error(f"{source}: model_type is {model_type!r}, but only GPT-2 ('gpt2') is supported")
    archs = get("architectures", default=["GPT2LMHeadModel"])
    if not any(a in ("GPT2LMHeadModel", "GPT2Model") for a in archs):
        raise GPT2Error(f"{source}: architectures {archs} is not GPT2LMHeadModel")
    act = get("activation_function", default="gelu_new")
    if act not in GELU_TANH:
        raise GPT2Error(f"{source}: activation_function {act!r} is not supported; this model uses "
                        f"GPT-2's tanh GELU ({' or '.join(GELU_TANH)})")
    for field, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)):
        if field in d and bool(d[field]) != want:
            raise GPT2Error(f"{source}: {field}={d[field]!r} is not supported (GPT-2 uses {want})")
    n_embd = get("n_embd", "hidden_size")
    cfg_fields = dict(
        vocab_size=get("vocab_size"), context_length=get("n_positions", "n_ctx", "max_position_embeddings"),
        emb_dim=n_embd, n_heads=get("n_head", "num_attention_heads"),
        n_layers=get("n_layer", "num_hidden_layers"))
    for ours, hf in (("vocab_size", "vocab_size"), ("context_length", "n_positions"),
                     ("emb_dim", "n_embd"), ("n_heads", "n_head"), ("n_layers", "n_layer")):
        if cfg_fields[ours] is None:
            raise GPT2Error(f"{source} has no {hf!r} field")
    n_inner = get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        raise GPT2Error(f"{source}: n_inner={n_inner} is not supported (our MLP is 4 * n_embd = {4 * n_embd} "
                        "wide)")
    eps = get("layer_norm_epsilon", default=1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0 or not math.isfinite(eps):
        raise GPT2Error(f"{source}: layer_norm_epsilon must be a positive number, got {eps!r}")
    dropout = get("resid_pdrop", default=0.0)
    tie = get("tie_word_embeddings", default=True)
    qkv_bias = get("minigrad_qkv_bias", default=True)
    try:
        config = GPTConfig(**cfg_fields, dropout=float(dropout), qkv_bias=bool(qkv_bias),
                           tie_embeddings=bool(tie))
    except GPT2Error as exc:
        raise GPT2Error(f"{source}: {exc}") from None
    return config, float(eps)


def config_to_hf(config: GPTConfig, layer_norm_epsilon: float = 1e-5, dtype: str = "float32") -> dict:
    """GPTConfig -> the fields of transformers' GPT2Config (what save_pretrained writes)."""
    eos = min(50256, config.vocab_size - 1)  # GPT-2's <|endoftext|>
    return {
        "activation_function": "gelu_new",
        "add_cross_attention": False,
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": config.dropout,
        "bos_token_id": eos,
        "embd_pdrop": config.dropout,
        "eos_token_id": eos,
        "initializer_range": 0.02,
        "layer_norm_epsilon": layer_norm_epsilon,
        "model_type": "gpt2",
        "n_ctx": config.context_length,
        "n_embd": config.emb_dim,
        "n_head": config.n_heads,
        "n_inner": None,
        "n_layer": config.n_layers,
        "n_positions": config.context_length,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": config.dropout,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": dtype,   # transformers 4.x's name for the dtype field ...
        "dtype": dtype,         # ... and 5.x's
        "use_cache": True,
        "vocab_size": config.vocab_size,
        # Ours, ignored by transformers: restores qkv_bias=False on re-import (see module docstring).
        "minigrad_qkv_bias": config.qkv_bias,
    }


# ---------------------------------------------------------------------------------------------
# Reading a safetensors header (for checks and clear messages before any weight is loaded)
# ---------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def read_safetensors_header(path, size: int | None = None) -> dict:
    """{name: (dtype string, shape, (begin, end))} from a .safetensors file's JSON header.

    The format: 8 bytes little-endian header length N, N bytes of JSON, then the raw data; each
    tensor's `data_offsets` are relative to the end of the header. Every claim of the header is
    checked against the file before anything is allocated (`gpt2.safeio`): a file that is too
    short for its header or for any tensor (an interrupted download) is a GPT2Error naming that
    tensor, and so is any malformed entry.
    """
    from .safeio import read_safetensors_header as read_checked  # noqa: PLC0415

    header = read_checked(path, fix=": delete it and download it again", size=size)
    return {t.name: (t.dtype, t.shape, (t.begin, t.end)) for t in header.tensors.values()}
