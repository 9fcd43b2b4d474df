# %% [markdown]
# # Chapter 06 — OpenAI's pretrained weights, and a faster way to generate
#
# Chapter 05 trained our GPT-2 on one short story: about 5,000 tokens. It learned to recite the
# story and little else. OpenAI trained the same architecture on WebText, some 9 billion tokens
# of web pages, and published the weights. Because our `GPTModel` computes exactly GPT-2's
# function, those weights drop straight into it: only the *names* and the *layout* of a few
# matrices differ, and `gpt2/hf.py` spells that mapping out.
#
# In this chapter:
#
# 1. the two layouts of the same numbers: Hugging Face's names and ours;
# 2. why four of the matrices are stored transposed;
# 3. loading GPT-2 124M with `load_pretrained("gpt2")`;
# 4. the KV cache: generating without recomputing the past, measured in tokens per second;
# 5. what GPT-2 predicts next, next to the model we trained in chapter 05;
# 6. both models' loss on The Verdict;
# 7. generating text with temperature and top-k;
# 8. exporting a model back to the Hugging Face layout.
#
# **The weights (548 MB) are downloaded once**, into `~/.cache/minigrad-gpt2/gpt2/` (set
# `GPT2_CACHE` for another place). Without network access the chapter says which two files to
# fetch and where to put them, shows the KV-cache speed-up on a randomly initialised model of
# the same shape, and stops there. `GPT2_PRETRAINED_DIR=/some/dir` loads the weights from a
# directory in the Hugging Face layout (config.json + model.safetensors) instead.

# %%
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import minigrad as mg
from gpt2 import GPT2Error, GPTModel, generate, gpt2_124m, hf
from gpt2.pretrained import download_instructions, export_hf, load_pretrained
from gpt2.tokenizer import get_tokenizer
from minigrad import F

QUICK = os.environ.get("GPT2_CHAPTER_QUICK", "") not in ("", "0")   # shorter generations
NAME = os.environ.get("GPT2_PRETRAINED_DIR") or "gpt2"
CH05_CHECKPOINT = Path(os.environ.get("GPT2_CHAPTER_OUT", "runs/chapter05")) / "checkpoint"
N_NEW = 10 if QUICK else 30        # tokens generated in the speed comparison
np.set_printoptions(precision=4, suppress=True)
print(f"weights: {NAME}, backend: {mg.get_backend()}, quick: {QUICK}")

# %% [markdown]
# ## 1. Two layouts of the same numbers
#
# A checkpoint is a dictionary from names to arrays. OpenAI's GPT-2, as Hugging Face's
# `GPT2LMHeadModel` stores it, calls the token embedding `transformer.wte.weight` where we say
# `tok_emb.weight`, and block i's attention input projection `transformer.h.i.attn.c_attn.weight`
# where we say `blocks.i.attn.qkv.weight`. `hf.tensor_specs` lists the whole mapping with the
# shapes each side stores (OpenAI's own files leave out the `transformer.` prefix; both load).

# %%
specs = hf.tensor_specs(gpt2_124m())
print(f"{'Hugging Face name':38} {'HF shape':>13}    {'our name':28} {'our shape':>13}")
for s in specs:
    if s.hf.startswith("h.") and not s.hf.startswith("h.0."):
        continue   # blocks 1..11 repeat block 0
    print(f"{hf.hf_file_name(s):38} {str(s.hf_shape):>13} -> {s.ours:28} {str(s.our_shape):>13}"
          + ("  transposed" if s.transpose else ""))
n_weights = sum(math.prod(s.hf_shape) for s in specs)
print(f"{len(specs)} tensors, {n_weights:,} numbers")
assert len(specs) == 4 + 12 * 12
assert n_weights == gpt2_124m().num_parameters() == 124_439_808

# %% [markdown]
# There is no `lm_head.weight` in the list: GPT-2 *ties* its output head to the token embedding,
# computing logits = x @ wte^T, so the 38.6M-number matrix is stored once. (The course model of
# chapter 05 has an untied head, as *LLMs from Scratch* trains it; `export_hf` writes such a
# head as `lm_head.weight` with `tie_word_embeddings: false`.)
#
# ## 2. Why four matrices are stored transposed
#
# OpenAI's code (TensorFlow) computed a projection as y = x @ W + b with W stored [in, out];
# Hugging Face kept that layout in a module it calls `Conv1D`. Our `nn.Linear`, like PyTorch's,
# stores W as [out, in] and computes y = x @ W^T + b. Same numbers, transposed: loading
# transposes c_attn, c_proj, c_fc and the MLP's c_proj; exporting transposes them back.

# %%
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 5, 8)).astype(np.float32)       # (B, T, C_in)
W_conv1d = rng.standard_normal((8, 24)).astype(np.float32)  # [in, out], as in the HF file
b = rng.standard_normal(24).astype(np.float32)
y_hf = x @ W_conv1d + b                                       # Conv1D's forward
y_ours = F.linear(mg.Tensor(x), mg.Tensor(W_conv1d.T), mg.Tensor(b)).numpy()   # nn.Linear's
print("max |difference|:", np.abs(y_hf - y_ours).max())
assert np.allclose(y_hf, y_ours, atol=1e-5)
# c_attn's 3C outputs are q, k and v side by side, in the same order as our qkv: no reshuffling.

# %% [markdown]
# ## 3. Loading GPT-2 124M
#
# `load_pretrained("gpt2")` downloads config.json and model.safetensors on first use, checks
# every tensor's name and shape against the config, builds a `GPTModel` *without* the random
# initialisation (it would be overwritten anyway) and copies the weights in, one tensor at a
# time. Safetensors files are plain bytes with a JSON header: loading one runs no code, unlike
# the pickle files of `torch.load`.

# %%
try:
    t0 = time.perf_counter()
    model = load_pretrained(NAME)
    print(f"Loaded {NAME}: {model.num_parameters():,} parameters in {time.perf_counter() - t0:.1f} s, "
          f"{model.tok_emb.weight.dtype}, {model.config}")
except GPT2Error as exc:
    model = None
    reason = str(exc).split(". To use")[0]   # the error repeats the instructions in one line
    print(f"The pretrained weights are not available here:\n  {reason}\n")
    print(download_instructions("gpt2"))
    print("\n(or set GPT2_PRETRAINED_DIR=/path/to/dir; the KV-cache demonstration below runs anyway)")

# %% [markdown]
# ## 4. The KV cache
#
# Generation appends one token at a time. Run naively, step n feeds all n tokens through every
# layer again, although the keys and values of the first n - 1 positions are the same as in the
# previous step: causal attention means a position never looks at what comes after it. A **KV
# cache** keeps every layer's keys and values. The prompt is run once (the *prefill*), and each
# later step feeds only the newest token: its query attends to the cached keys and values, and its
# own key and value are appended. Per step, the work drops from n positions to one.
#
# The tokens are exactly the same; only the time changes. Once the context window is full, the
# position embeddings of every token shift with each new one, so the cached path then recomputes
# the cropped window just as the naive path does. The cache costs memory: 2 (keys and values)
# x layers x positions x width numbers per sequence, 75 MB for GPT-2 124M at 1,024 positions.
#
# Speed does not depend on what the weights are, so without the pretrained weights we time a
# randomly initialised model of the same shape.

# %%
if model is not None:
    speed_model, which = model, NAME
else:
    mg.manual_seed(0)
    speed_model, which = GPTModel(gpt2_124m()), "a random GPT-2 124M-shaped model"
tokenizer = get_tokenizer()
prompt_ids = np.asarray(tokenizer.encode("Every effort moves you, and the rest of the story"))[None, :]
cfg = speed_model.config
cache_mib = 2 * cfg.n_layers * cfg.context_length * cfg.emb_dim * speed_model.tok_emb.weight.dtype.itemsize
print(f"timing {which}: prompt of {prompt_ids.shape[1]} tokens, {N_NEW} new tokens, greedy; "
      f"a full cache takes {cache_mib / 2**20:.0f} MiB per sequence")
results = {}
for use_cache in (True, False):
    generate(speed_model, prompt_ids, 2, use_cache=use_cache)     # warm-up
    t0 = time.perf_counter()
    out = generate(speed_model, prompt_ids, N_NEW, use_cache=use_cache)
    dt = time.perf_counter() - t0
    results[use_cache] = (out, N_NEW / dt)
    print(f"  use_cache={use_cache!s:5}  {dt:6.2f} s  {N_NEW / dt:7.1f} tokens/s")
speedup = results[True][1] / results[False][1]
print(f"KV cache speed-up: x{speedup:.1f} (one run each; timings on a busy machine vary)")
assert np.array_equal(results[True][0], results[False][0]), "the cache must not change the tokens"
print("identical tokens with and without the cache:", True)

# %% [markdown]
# The speed-up grows with the length of the text: the naive path's cost per token grows with n,
# the cached path's stays almost flat (one token through the weights, plus attention over n
# cached keys).
#
# Everything after this point needs the pretrained weights.

# %%
if model is None:
    print("No pretrained weights: stopping here (see above for what to download and where to put it).")
    sys.exit(0)   # in a notebook this stops the run here
del speed_model
print("continuing with", NAME)

# %% [markdown]
# ## 5. What does GPT-2 predict next?
#
# The last position's logits, through a softmax, are the model's probabilities for the next
# token. We show the five most likely continuations of the book's prompt for GPT-2, and for the
# model trained in chapter 05 if its checkpoint is there (`python chapters/05_train.py` writes
# it to runs/chapter05/checkpoint).

# %%
def top_next_tokens(m, text, k=5):
    ids = np.asarray(tokenizer.encode(text))[None, -m.config.context_length:]
    m.eval()
    with mg.no_grad():
        z = m(ids).numpy()[0, -1].astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    best = np.argsort(-p)[:k]
    return [(tokenizer.decode([int(i)]), float(p[i])) for i in best]


start_context = "Every effort moves you"
models = {f"pretrained {NAME}": model}
if CH05_CHECKPOINT.is_dir():
    from gpt2.checkpoint import load_model
    models["chapter 05 (The Verdict)"] = load_model(CH05_CHECKPOINT).eval()
else:
    print(f"(no chapter-05 checkpoint at {CH05_CHECKPOINT}: run chapters/05_train.py to compare with it)")
for label, m in models.items():
    preds = top_next_tokens(m, start_context)
    print(f"{label:28} " + "  ".join(f"{t!r} {p:.3f}" for t, p in preds))
    assert abs(sum(p for _, p in preds) - 1) < 1 and preds[0][1] >= preds[-1][1]

# %% [markdown]
# ## 6. Loss on The Verdict
#
# The same measurement as chapter 05: the average cross-entropy of the next token, on the
# story's training part (the first 90%) and on its validation part (the last 10%, which chapter
# 05's model never saw). The model trained on the story has memorised its training part; GPT-2
# has never seen the story at all, yet predicts its unseen part far better.

# %%
from gpt2.data import create_loaders, load_text
from gpt2.evaluate import calc_loss_loader

try:
    text = load_text()
except GPT2Error as exc:
    text = None
    print("The Verdict is not available, skipping the losses:", exc)
if text is not None:
    window = min(256, *(m.config.context_length for m in models.values()))
    train_loader, val_loader = create_loaders(text, batch_size=2, max_length=window, seed=123,
                                              tokenizer=tokenizer)
    losses = {}
    for label, m in models.items():
        t0 = time.perf_counter()
        tr = calc_loss_loader(train_loader, m, num_batches=1 if QUICK else 3)
        va = calc_loss_loader(val_loader, m)
        losses[label] = va
        print(f"{label:28} train loss {tr:.3f}   val loss {va:.3f} (perplexity {math.exp(va):,.1f})"
              f"   [{time.perf_counter() - t0:.1f} s]")
        assert math.isfinite(tr) and math.isfinite(va)
    if NAME == "gpt2":   # the real weights: the book reports a validation loss of about 3.56
        assert losses[f"pretrained {NAME}"] < 4.5

# %% [markdown]
# ## 7. Generating text
#
# Greedy decoding (temperature 0) always takes the most likely token and tends to loop. Sampling
# from softmax(logits / T) with only the k most likely tokens kept (top-k) gives varied text that
# stays on topic; a seed makes a sample reproducible.

# %%
prompt_ids = np.asarray(tokenizer.encode(start_context))[None, :]
n = 15 if QUICK else 30
greedy = tokenizer.decode(generate(model, prompt_ids, n, eos_id=tokenizer.eot_id)[0])
print("greedy:              ", repr(greedy))
for temperature, top_k, seed in ((0.7, 50, 123), (1.0, 40, 123), (1.5, 50, 123)):
    ids = generate(model, prompt_ids, n, temperature=temperature, top_k=top_k, seed=seed,
                   eos_id=tokenizer.eot_id)
    print(f"T={temperature}, top-k={top_k}, seed={seed}:", repr(tokenizer.decode(ids[0])))
again = generate(model, prompt_ids, n, temperature=1.5, top_k=50, seed=123, eos_id=tokenizer.eot_id)
assert np.array_equal(again, ids), "the same seed gives the same sample"
assert greedy.startswith(start_context)

# %% [markdown]
# ## 8. Exporting back to the Hugging Face layout
#
# `export_hf` writes config.json and model.safetensors with Hugging Face's names and layouts, so
# that `transformers.GPT2LMHeadModel.from_pretrained(dir)` loads a model trained here (we test
# that the round trip through our own loader is exact, bit for bit).

# %%
with tempfile.TemporaryDirectory() as tmp:
    out_dir = export_hf(model, Path(tmp) / "exported")
    for p in sorted(out_dir.iterdir()):
        print(f"  {p.name:18} {p.stat().st_size:>13,} bytes")
    back = load_pretrained(out_dir)
    same = all(np.array_equal(mg.to_numpy(a.data), mg.to_numpy(b.data))
               for a, b in zip(model.parameters(), back.parameters()))
    print("export -> load gives identical weights:", same)
    assert same and back.config == model.config
    del back

print("\nFrom the command line:\n"
      f'  python -m gpt2 generate --pretrained {NAME} --prompt "{start_context}" --temperature 1.0 '
      "--top-k 40 --seed 1")
