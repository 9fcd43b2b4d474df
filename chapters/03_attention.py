# %% [markdown]
# # Chapter 3: Attention
#
# Attention lets every token look at the other tokens and pull in what it needs: "it" can
# fetch what "it" refers to. Following *LLMs from Scratch*, chapter 3, we build it in steps:
#
# 1. simplified self-attention: weights from dot products, no trainable parameters;
# 2. scaled dot-product attention with trainable query, key and value projections;
# 3. the causal mask: a token may not look at the tokens after it;
# 4. dropout on the attention weights;
# 5. multi-head attention, first as a loop over heads, then batched as GPT-2 does it,
#    checked against `gpt2.model.CausalSelfAttention`.
#
# Everything is small NumPy first, then compared with minigrad's fused
# `F.scaled_dot_product_attention` (one graph node with a hand-derived backward).

# %%
import math

import numpy as np

import minigrad as mg
from gpt2 import GPTConfig
from gpt2.model import CausalSelfAttention
from minigrad import F

np.set_printoptions(precision=4, suppress=True)


def softmax(z, axis=-1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))   # minus the max: no overflow
    return e / e.sum(axis=axis, keepdims=True)


# %% [markdown]
# ## 1. Simplified self-attention
#
# Six tokens, "Your journey starts with one step", each already a 3-dimensional embedding.
# For the query "journey" (x2): the attention score with each token is a dot product; softmax
# turns the scores into weights that sum to 1; the context vector is the weighted sum of all
# the inputs.

# %%
inputs = np.array([[0.43, 0.15, 0.89],   # Your     (x1)
                   [0.55, 0.87, 0.66],   # journey  (x2)
                   [0.57, 0.85, 0.64],   # starts   (x3)
                   [0.22, 0.58, 0.33],   # with     (x4)
                   [0.77, 0.25, 0.10],   # one      (x5)
                   [0.05, 0.80, 0.55]])  # step     (x6)
query = inputs[1]
attn_scores_2 = inputs @ query
attn_weights_2 = softmax(attn_scores_2)
context_vec_2 = attn_weights_2 @ inputs
print("scores: ", attn_scores_2)
print("weights:", attn_weights_2, "sum", attn_weights_2.sum())
print("context:", context_vec_2)
assert np.allclose(attn_scores_2, [0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865], atol=1e-4)
assert np.allclose(context_vec_2, [0.4419, 0.6515, 0.5683], atol=1e-4)

# %% [markdown]
# All six queries at once are two matrix products: scores = X X^T (6, 6), context = softmax(scores) X.

# %%
attn_weights = softmax(inputs @ inputs.T)
all_context_vecs = attn_weights @ inputs
print(all_context_vecs)
assert np.allclose(attn_weights.sum(axis=-1), 1) and np.allclose(all_context_vecs[1], context_vec_2)

# %% [markdown]
# ## 2. Trainable weights: queries, keys, values
#
# Each token is projected three ways: a *query* (what am I looking for?), a *key* (what do I
# contain?) and a *value* (what do I hand over?). Scores are query . key, divided by sqrt(d_k)
# so that their spread does not grow with the dimension (softmax would saturate otherwise).

# %%
rng = np.random.default_rng(123)
d_in, d_out = 3, 2
W_query, W_key, W_value = (rng.random((d_in, d_out)) for _ in range(3))
queries, keys, values = inputs @ W_query, inputs @ W_key, inputs @ W_value   # each (6, 2)
scores = queries @ keys.T / math.sqrt(d_out)                                 # (6, 6)
context = softmax(scores) @ values                                           # (6, 2)
print(context)

lib = F.scaled_dot_product_attention(mg.Tensor(queries), mg.Tensor(keys), mg.Tensor(values), causal=False)
assert np.allclose(lib.numpy(), context)
print("F.scaled_dot_product_attention (no mask) agrees")

# %% [markdown]
# ## 3. The causal mask
#
# A language model predicts each token from the ones *before* it, so position i may not attend
# to positions j > i. Two ways to do it: zero the weights above the diagonal and renormalise
# the rows, or set those scores to -inf before the softmax (e^-inf = 0). They give the same
# weights; the second is one step and is what the library does.

# %%
T = len(inputs)
mask = np.triu(np.ones((T, T), dtype=bool), k=1)          # True above the diagonal: the future
weights = softmax(scores)
masked_simple = np.where(mask, 0.0, weights)
masked_simple /= masked_simple.sum(axis=-1, keepdims=True)
masked_inf = softmax(np.where(mask, -np.inf, scores))
print(masked_inf)
assert np.allclose(masked_simple, masked_inf)
assert np.array_equal(mg.to_numpy(F.causal_mask(T, T)), mask)

causal_context = masked_inf @ values
lib = F.scaled_dot_product_attention(mg.Tensor(queries), mg.Tensor(keys), mg.Tensor(values), causal=True)
assert np.allclose(lib.numpy(), causal_context)
assert np.allclose(causal_context[0], values[0])          # the first token can only see itself
print("causal attention agrees")

# %% [markdown]
# ## 4. Dropout on the attention weights
#
# During training, dropout zeroes a random half (here) of the weights and scales the rest by
# 1 / (1 - p) = 2, so their expected value is unchanged; in evaluation it does nothing. GPT-2
# uses p = 0.1 (and only while training from scratch).

# %%
mg.manual_seed(123)
ones = mg.Tensor(np.ones((6, 6), dtype=np.float32))
dropped = F.dropout(ones, p=0.5, training=True).numpy()
print(dropped)
assert set(np.unique(dropped)) <= {0.0, 2.0} and 0 < (dropped == 0).sum() < 36
assert np.array_equal(F.dropout(ones, p=0.5, training=False).numpy(), ones.numpy())

# %% [markdown]
# ## 5. Multi-head attention
#
# Several attention heads run side by side, each with its own (smaller) queries, keys and
# values, so one can track syntax while another tracks who-is-who. Their outputs are
# concatenated and mixed by one more projection.
#
# GPT-2's layer (`CausalSelfAttention`) computes all queries, keys and values with a single
# matrix, `qkv` (C -> 3C); head h uses columns h*D..(h+1)*D of each, D = C / H. We take a small
# layer from the library and recompute its output by hand, first with a loop over heads.

# %%
config = GPTConfig(vocab_size=10, context_length=8, emb_dim=6, n_heads=2, n_layers=1, dropout=0.0,
                   qkv_bias=False)
mg.manual_seed(0)
attn = CausalSelfAttention(config)
batch = np.stack([inputs @ rng.random((3, 6)), inputs @ rng.random((3, 6))]).astype(np.float32)   # (2, 6, 6)
B, T, C = batch.shape
H, D = config.n_heads, config.head_dim

W_qkv, W_o, b_o = attn.qkv.weight.numpy(), attn.proj.weight.numpy(), attn.proj.bias.numpy()
qkv = batch @ W_qkv.T                                   # (B, T, 3C)
q_all, k_all, v_all = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
heads = []
for h in range(H):                                      # one head at a time, as the book's wrapper
    cols = slice(h * D, (h + 1) * D)
    s = q_all[..., cols] @ k_all[..., cols].transpose(0, 2, 1) / math.sqrt(D)   # (B, T, T)
    heads.append(softmax(np.where(mg.to_numpy(F.causal_mask(T, T)), -np.inf, s)) @ v_all[..., cols])
by_loop = np.concatenate(heads, axis=-1) @ W_o.T + b_o   # (B, T, C)

# %% [markdown]
# The batched way: reshape (B, T, C) to (B, T, H, D) and move the heads forward to
# (B, H, T, D), so that every head of every sequence is one batched matrix product.

# %%
def split_heads(a):
    return a.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)


s = split_heads(q_all) @ split_heads(k_all).transpose(0, 1, 3, 2) / math.sqrt(D)       # (B, H, T, T)
y = softmax(np.where(mg.to_numpy(F.causal_mask(T, T)), -np.inf, s)) @ split_heads(v_all)  # (B, H, T, D)
batched = y.transpose(0, 2, 1, 3).reshape(B, T, C) @ W_o.T + b_o

library = attn(mg.Tensor(batch)).numpy()
print("output shape:", library.shape)
print(library[0])
assert np.allclose(by_loop, batched, atol=1e-5) and np.allclose(library, batched, atol=1e-5)
print("loop over heads == batched heads == gpt2.model.CausalSelfAttention")

# %% [markdown]
# And the layer's backward pass (hand-derived inside `F.scaled_dot_product_attention`) agrees
# with finite differences, in float64:

# %%
mg.set_default_dtype(np.float64)
mg.manual_seed(0)
attn64 = CausalSelfAttention(config)
x64 = mg.Tensor(batch.astype(np.float64), requires_grad=True)
assert mg.gradcheck(lambda x, *params: attn64(x), x64, *attn64.parameters())
mg.set_default_dtype(np.float32)
print("gradcheck passed for the input and all", len(attn64.parameters()), "parameters")
