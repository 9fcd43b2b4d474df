# %% [markdown]
# # Chapter 7: A character-level GPT on Tiny Shakespeare
#
# Chapter 05 trained on one short story: 5,000 tokens, one batch of validation, a run that
# proves the loop works and then memorises. This chapter is the next exercise every learner
# does -- nanoGPT's first one: a real corpus (Tiny Shakespeare, 1,115,394 characters, the
# char-rnn collection of Shakespeare's plays), a character-level tokenizer, random windows read
# from a prepared dataset on disk, a learning-rate schedule (warmup, then cosine decay to a
# floor), gradient accumulation, and an evaluation that averages many random batches.
#
# The model and settings are nanoGPT's CPU Shakespeare run: 4 layers, 4 heads, 128 wide,
# context 64, batch 12, dropout 0, tied head, biases on, AdamW lr 1e-3 (beta2 0.99, weight decay
# 0.1 on matrices only), 100 warmup steps, cosine decay to 1e-4 over 2000 steps, gradient norm
# clipped to 1. nanoGPT reaches a validation loss of about 1.88 there; so should we.
#
# `GPT2_CHAPTER_QUICK=1 python chapters/07_shakespeare.py` trains a tiny model for a few steps
# instead (the tests do this). The full run takes a few minutes on a laptop CPU.

# %%
import math
import os
import time
from pathlib import Path

import numpy as np

import minigrad as mg
from gpt2 import GPTConfig, GPTModel, generate
from gpt2.checkpoint import load_checkpoint, save_checkpoint
from gpt2.data import named_text_path
from gpt2.dataset import PreparedDataset
from gpt2.evaluate import calc_loss_batch
from gpt2.plot import plot_losses
from gpt2.prepare import prepare
from gpt2.tokenizer import CharTokenizer
from gpt2.train import TrainConfig, make_optimizer, train
from gpt2.train_extras import accumulate_gradients
from minigrad.optim import WarmupCosine

QUICK = os.environ.get("GPT2_CHAPTER_QUICK", "") not in ("", "0")
mg.backend.tune_malloc()   # as `python -m gpt2` does: freed memory reused step after step
OUT = Path(os.environ.get("GPT2_CHAPTER_OUT", "runs/chapter07"))   # git-ignored
print(f"mode: {'quick' if QUICK else 'full nanoGPT run'}, backend {mg.get_backend()}, output in {OUT}/")

# %% [markdown]
# ## 1. The text
#
# `named_text_path("shakespeare")` downloads the file once into the data folder and checks its
# SHA-256 (`python -m gpt2 prepare shakespeare` does the same); offline, its error says where
# to save the file by hand.

# %%
path = named_text_path("shakespeare")
text = path.read_text(encoding="utf-8")
print(f"{path}: {len(text):,} characters")
print(text[:200])
assert len(text) == 1_115_394

# %% [markdown]
# ## 2. A character-level tokenizer, built inline
#
# The vocabulary is every distinct character, sorted; a character's id is its position. No
# merges, no unknown-word problem within the corpus -- and 65 rows in the embedding instead of
# GPT-2's 50,257, so a small model spends its parameters on the transformer, not the vocabulary.
# The price: sequences are about 3x longer than with BPE (1,115,394 characters vs 338,025
# GPT-2 tokens), so a window of 64 sees only a line or two.

# %%
chars = sorted(set(text))
stoi = {c: i for i, c in enumerate(chars)}
itos = {i: c for i, c in enumerate(chars)}


def encode(s):
    return [stoi[c] for c in s]


def decode(ids):
    return "".join(itos[int(i)] for i in ids)


print(f"vocabulary: {len(chars)} characters: {''.join(chars)!r}")
print(encode("To be, or not to be"), "->", decode(encode("To be, or not to be")))
assert len(chars) == 65 and decode(encode(text[:1000])) == text[:1000]

# The library's CharTokenizer is the same thing (plus a clear error for unknown characters):
tok = CharTokenizer.from_text(text)
assert tok.chars == "".join(chars) and tok.encode(text[:5000]) == encode(text[:5000])
try:
    tok.encode("Zo\u00eb")
except Exception as exc:
    print("refused:", exc)

# %% [markdown]
# ## 3. Preparing the dataset: ids on disk, a 90/10 split
#
# `prepare` streams the text (a corpus larger than memory is never read whole), writes every
# id as uint16 (65 < 65,536: 2 bytes a character) into shard files, and a manifest.json with the
# tokenizer, the counts and the source's SHA-256. The first 90% of the ids are training data,
# the last 10% validation -- exactly nanoGPT's `data/shakespeare_char/prepare.py` split.

# %%
manifest = prepare([path], OUT / "shakespeare_char", tokenizer="char", overwrite=True, progress=False)
ds = PreparedDataset(OUT / "shakespeare_char")
n_train = int(len(text) * 0.9)
print({k: manifest[k] for k in ("tokenizer", "vocab_size", "dtype", "tokens")} | {"chars": "..."})
print(f"train {ds.num_tokens('train'):,} ids, val {ds.num_tokens('val'):,} ids")
assert (ds.num_tokens("train"), ds.num_tokens("val")) == (1_003_854, 111_540)
assert ds.num_tokens("train") == n_train
train_ids = ds.shards["train"][0]                       # a np.memmap: read from disk on demand
assert np.array_equal(train_ids[:10_000], encode(text[:10_000]))
assert manifest["sources"][0]["sha256"] == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

# %% [markdown]
# ## 4. Random windows
#
# With a million ids there is no need for epochs of fixed windows: each batch is B windows of
# T + 1 ids starting at random places (nanoGPT's `get_batch`). Input = the first T, target =
# the last T. The library's loader draws batch i from a generator seeded with (seed, split, i),
# so batch i is the same whatever came before it: resuming a run needs only a counter.

# %%
B, T = 12, 64
rng = np.random.default_rng(0)
starts = rng.integers(0, len(train_ids) - T, size=B)               # (B,)
windows = np.stack([train_ids[s:s + T + 1] for s in starts])       # (B, T+1)
x_hand, y_hand = windows[:, :-1], windows[:, 1:]
print("a window by hand:", repr(decode(x_hand[0][:40])), "...")

train_loader = ds.loader("train", batch_size=B, context_length=T, seed=123)
x, y = train_loader.get_batch(0)
assert x.shape == y.shape == (B, T) and np.array_equal(x[:, 1:], y[:, :-1])
assert all(decode(row) in text for row in x)                       # real windows of the text
assert np.array_equal(train_loader.get_batch(0)[0], x)             # batch 0 again: the same

# %% [markdown]
# ## 5. The schedule: linear warmup, then cosine decay to a floor
#
# At the start Adam's moment estimates are noisy and the weights random, so big steps do harm;
# the learning rate climbs linearly over the first `warmup` steps. Then it follows half a cosine
# from the peak down to `min_lr` at the last step: large steps while the loss is high, small
# ones to settle at the end.
#
#     lr(t) = max_lr * (t + 1) / warmup                                   t < warmup
#     lr(t) = min_lr + (max_lr - min_lr) * (1 + cos(pi * p)) / 2,         p = (t - warmup) / (total - warmup)

# %%
MAX_LR, MIN_LR, WARMUP, TOTAL = 1e-3, 1e-4, 100, 2000


def lr_by_hand(t):
    if t < WARMUP:
        return MAX_LR * (t + 1) / WARMUP
    p = (t - WARMUP) / (TOTAL - WARMUP)
    return MIN_LR + (MAX_LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * p))


schedule = WarmupCosine(max_lr=MAX_LR, warmup_steps=WARMUP, total_steps=TOTAL, min_lr=MIN_LR)
for t in (0, 49, 99, 100, 500, 1050, 1999):
    print(f"step {t:4d}: lr {schedule(t):.2e}")
assert all(math.isclose(schedule(t), lr_by_hand(t)) for t in range(TOTAL))
assert schedule(WARMUP) == MAX_LR and math.isclose(schedule(TOTAL), MIN_LR)

# %% [markdown]
# ## 6. Gradient accumulation
#
# A bigger batch gives a less noisy gradient but needs memory for all its activations at once.
# Accumulation gets the same gradient in the memory of a small batch: N batches of B windows,
# each loss divided by N, backward after each. Gradients add up in `p.grad`, and
# sum_k (loss_k / N) is the mean loss over all N*B windows -- the loss of one batch of N*B.
# (`train --grad-accum N`; nanoGPT's `gradient_accumulation_steps`.)

# %%
mg.manual_seed(0)
tiny = GPTModel(GPTConfig(vocab_size=65, context_length=T, emb_dim=32, n_heads=2, n_layers=2))
xb, yb = train_loader.get_batch(1)                          # 12 windows
big = calc_loss_batch(xb, yb, tiny)                         # one batch of 12
big.backward()
g_big = {n: mg.to_numpy(p.grad).copy() for n, p in tiny.named_parameters()}
tiny.zero_grad()
acc_loss = accumulate_gradients(tiny, [(xb[i:i + 3], yb[i:i + 3]) for i in range(0, 12, 3)])   # 4 x 3
print(f"loss of one batch of 12: {big.item():.6f}; accumulated over 4 batches of 3: {acc_loss:.6f}")
assert math.isclose(acc_loss, big.item(), rel_tol=1e-5)
for name, p in tiny.named_parameters():
    assert np.allclose(mg.to_numpy(p.grad), g_big[name], rtol=1e-4, atol=1e-7), name

# %% [markdown]
# ## 7. Training
#
# nanoGPT's model: GPT-2's architecture and initialisation (normal(0, 0.02), the projections
# into the residual stream scaled by 1/sqrt(2 * n_layers)), biases everywhere, the head tied to
# the token embedding. Weight decay only on matrices (not biases and LayerNorm). Evaluation
# every 250 steps averages 20 random batches of each split (and once more after the last step).
#
# The same run from the command line (after `python -m gpt2 prepare shakespeare --tokenizer char
# --out data/shakespeare_char`):
#
#     python -m gpt2 train --data data/shakespeare_char --n-layer 4 --n-head 4 --n-embd 128 \
#       --context-length 64 --batch-size 12 --dropout 0 --qkv-bias --tie --init gpt2 --lr 1e-3 \
#       --min-lr 1e-4 --warmup-steps 100 --beta2 0.99 --weight-decay 0.1 --no-decay-all \
#       --grad-clip 1.0 --max-steps 2000 --eval-every 250 --eval-iters 20 --out runs/shakespeare

# %%
if QUICK:   # a tiny model and a few steps: the same code path in seconds
    config = GPTConfig(vocab_size=tok.vocab_size, context_length=32, emb_dim=32, n_heads=2, n_layers=2,
                       dropout=0.0, qkv_bias=True, tie_embeddings=True)
    STEPS, EVAL_EVERY, EVAL_ITERS, BATCH = 30, 10, 4, 8
else:
    config = GPTConfig(vocab_size=tok.vocab_size, context_length=64, emb_dim=128, n_heads=4, n_layers=4,
                       dropout=0.0, qkv_bias=True, tie_embeddings=True)
    STEPS, EVAL_EVERY, EVAL_ITERS, BATCH = 2000, 250, 20, 12
mg.manual_seed(123)
model = GPTModel(config)
print(config)
print(f"{model.num_parameters():,} parameters")
train_loader = ds.loader("train", BATCH, config.context_length, seed=123)
val_loader = ds.loader("val", BATCH, config.context_length, seed=123)
optimizer = make_optimizer(model, lr=MAX_LR, weight_decay=0.1, decay_all=False, betas=(0.9, 0.99))
t0 = time.perf_counter()
history = train(model, train_loader, val_loader, optimizer,
                TrainConfig(max_steps=STEPS, eval_every=EVAL_EVERY, eval_iter=EVAL_ITERS, grad_clip=1.0,
                            warmup_steps=min(WARMUP, STEPS // 3), min_lr=MIN_LR, eval_final=True,
                            sample_prompt=None))
seconds = time.perf_counter() - t0
print(f"{STEPS} steps in {seconds:.0f} s ({1000 * seconds / STEPS:.0f} ms/step including evaluations); "
      f"final: train loss {history.train_losses[-1]:.4f}, val loss {history.val_losses[-1]:.4f}")
assert history.val_losses[-1] < history.val_losses[0] - 0.3      # it learned something
if not QUICK:
    assert history.val_losses[-1] <= 1.90, history.val_losses[-1]   # nanoGPT: 1.88

# %% [markdown]
# ## 8. Sampling
#
# Temperature 0.8 and top-k 200, as nanoGPT's sample.py. After 2000 steps the model has the
# *form* of a play -- speaker names in capitals, a colon, line breaks, verse-like lines -- with
# words that are often English and sentences that are not.

# %%
prompt = np.asarray([tok.encode("\n")], dtype=np.int64)           # (1, 1)
out = generate(model, prompt, max_new_tokens=300, temperature=0.8, top_k=200, seed=42)
sample = tok.decode(out[0])
print(sample)
assert len(sample) == 301 and set(sample) <= set(chars)

# %% [markdown]
# ## 9. Saving: the checkpoint records its tokenizer
#
# `save_checkpoint(..., tokenizer=tok)` writes tokenizer.json beside the weights, so
# `python -m gpt2 generate --checkpoint DIR --prompt "ROMEO:"` encodes and decodes characters
# with no extra flags (and refuses a prompt with a character the vocabulary lacks).

# %%
ckpt_dir = save_checkpoint(OUT / "checkpoint", model, tokenizer=tok)
reloaded = load_checkpoint(ckpt_dir)
assert reloaded.tokenizer == tok
plot = plot_losses(history, OUT / "loss.png", title="char-level GPT on Tiny Shakespeare")
print("saved", ckpt_dir, "and", plot)
