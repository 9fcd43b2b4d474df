# %% [markdown]
# # Chapter 4: A GPT model from the pieces
#
# With attention in hand, the rest of GPT-2 is a handful of small parts. Following
# *LLMs from Scratch*, chapter 4:
#
# 1. the configuration, and the four sizes OpenAI released;
# 2. layer normalisation;
# 3. GELU and the feed-forward network;
# 4. shortcut (residual) connections, and why deep networks need them;
# 5. the transformer block;
# 6. the whole model: embeddings, 12 blocks, final norm, output head -- parameters and memory;
# 7. generating text (from an untrained model: gibberish, until chapter 5).
#
# Each part is computed by hand in NumPy, then compared with `gpt2.model`.

# %%
import math

import numpy as np

import minigrad as mg
from gpt2 import MODEL_SIZES, GPTConfig, GPTModel, config_for, course_config, generate
from gpt2.model import MLP, Block, model_memory_bytes
from gpt2.tokenizer import get_tokenizer
from minigrad import F, nn

np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## 1. The configuration
#
# GPT-2 small ("124M"): a vocabulary of 50,257 BPE tokens, 1,024 positions, a 768-wide residual
# stream, 12 heads of 64 dimensions, 12 blocks. The course run (chapter 5) keeps that shape but
# uses 256 positions, dropout 0.1, no bias on the query/key/value projection and a separate
# output head, as the book does.

# %%
print(config_for("gpt2-124m"))
print(course_config())

# %% [markdown]
# ## 2. Layer normalisation
#
# Each token's vector is shifted and scaled to mean 0 and variance 1 over its C features, then
# a learned scale and shift are applied. It keeps activations in a range where training is
# stable. (The variance is the biased one, dividing by C, as GPT-2's.)

# %%
rng = np.random.default_rng(123)
batch_example = rng.standard_normal((2, 5)).astype(np.float32)
mean = batch_example.mean(axis=-1, keepdims=True)
var = batch_example.var(axis=-1, keepdims=True)
normed = (batch_example - mean) / np.sqrt(var + 1e-5)
print("mean:", normed.mean(axis=-1), "variance:", normed.var(axis=-1))
assert np.allclose(normed.mean(axis=-1), 0, atol=1e-6) and np.allclose(normed.var(axis=-1), 1, atol=1e-3)

ln = nn.LayerNorm(5)   # scale 1, shift 0 at the start
assert np.allclose(ln(mg.Tensor(batch_example)).numpy(), normed, atol=1e-6)
assert np.allclose(F.layer_norm(mg.Tensor(batch_example)).numpy(), normed, atol=1e-6)
print("nn.LayerNorm agrees")

# %% [markdown]
# ## 3. GELU and the feed-forward network
#
# GELU(x) = x * Phi(x) is a smooth ReLU: slightly negative for small negative x, with a
# non-zero gradient everywhere. GPT-2 uses the tanh approximation
# 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

# %%
x = np.linspace(-3, 3, 7, dtype=np.float32)
gelu_by_hand = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
print("x:   ", x)
print("GELU:", gelu_by_hand)
print("ReLU:", np.maximum(x, 0))
assert np.allclose(F.gelu(mg.Tensor(x)).numpy(), gelu_by_hand, atol=1e-6)

# %% [markdown]
# The feed-forward network works on each position separately: widen C -> 4C, GELU, back to C.
# Most of GPT-2's parameters live here (8 C^2 per block, against 4 C^2 in attention).

# %%
tiny = GPTConfig(vocab_size=50257, context_length=8, emb_dim=16, n_heads=2, n_layers=2, dropout=0.0,
                 qkv_bias=False, tie_embeddings=False)   # the course run's choices, much smaller
mg.manual_seed(0)
mlp = MLP(tiny)
xs = rng.standard_normal((2, 3, 16)).astype(np.float32)          # (B, T, C)
hidden = xs @ mlp.fc.weight.numpy().T + mlp.fc.bias.numpy()         # (B, T, 4C)
hidden = 0.5 * hidden * (1 + np.tanh(math.sqrt(2 / math.pi) * (hidden + 0.044715 * hidden**3)))
ff_by_hand = hidden @ mlp.proj.weight.numpy().T + mlp.proj.bias.numpy()   # (B, T, C)
print("feed-forward:", xs.shape, "->", ff_by_hand.shape)
assert np.allclose(mlp(mg.Tensor(xs)).numpy(), ff_by_hand, atol=1e-5)

# %% [markdown]
# ## 4. Shortcut connections
#
# In a deep stack the gradient reaching the first layers is a product of many per-layer
# factors and can shrink towards zero. Adding each layer's input to its output (x + f(x))
# gives the gradient a direct path back. The book's experiment: five small layers, with and
# without shortcuts; compare the mean absolute gradient of each layer's weights.

# %%
class DeepNet(nn.Module):
    def __init__(self, sizes, use_shortcut):
        self.use_shortcut = use_shortcut
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for layer in self.layers:
            out = F.gelu(layer(x))
            x = x + out if self.use_shortcut and out.shape == x.shape else out
        return x


def layer_gradients(net):
    net.zero_grad()
    out = net(mg.Tensor(np.array([[1.0, 0.0, -1.0]], dtype=np.float32)))
    F.mse_loss(out, np.zeros((1, 1), dtype=np.float32)).backward()
    return [float(np.abs(layer.weight.grad).mean()) for layer in net.layers]


sizes = [3, 3, 3, 3, 3, 1]
mg.manual_seed(123)
plain = layer_gradients(DeepNet(sizes, use_shortcut=False))
mg.manual_seed(123)
shortcut = layer_gradients(DeepNet(sizes, use_shortcut=True))
for i, (a, b) in enumerate(zip(plain, shortcut)):
    print(f"layer {i}: mean |grad| without shortcut {a:.6f}, with {b:.6f}")
assert shortcut[0] > 10 * plain[0]   # the first layer hardly learns without the shortcut

# %% [markdown]
# ## 5. The transformer block
#
# Pre-LayerNorm, as GPT-2: x + attn(ln1(x)), then x + mlp(ln2(x)). The block keeps the shape
# (B, T, C), so blocks stack. We recompute a library block from its own parts.

# %%
mg.manual_seed(0)
block = Block(tiny)
xt = mg.Tensor(rng.standard_normal((2, 4, 16)).astype(np.float32))
h = xt.numpy() + block.attn(block.ln1(xt)).numpy()
by_hand = h + block.mlp(block.ln2(mg.Tensor(h))).numpy()
out = block(xt).numpy()
print("block:", xt.shape, "->", out.shape)
assert out.shape == xt.shape and np.allclose(out, by_hand, atol=1e-5)

# %% [markdown]
# ## 6. The whole model
#
# ids (B, T) -> token embedding + position embedding -> dropout -> blocks -> final LayerNorm ->
# output head (C -> vocabulary) -> logits (B, T, V). Recomputed from the model's own modules:

# %%
mg.manual_seed(0)
model = GPTModel(tiny).eval()
ids = np.array([[6109, 3626, 6100, 345],     # "Every effort moves you"
                [6109, 1110, 6622, 257]])    # "Every day holds a"
hx = model.tok_emb(ids) + model.pos_emb(np.arange(4))
for blk in model.blocks:
    hx = blk(hx)
logits_by_hand = F.linear(model.ln_f(hx), model.head.weight).numpy()
logits = model(ids).numpy()
print("logits:", logits.shape)
assert logits.shape == (2, 4, 50257) and np.allclose(logits, logits_by_hand, atol=1e-5)
assert model.num_parameters() == tiny.num_parameters()

# %% [markdown]
# Parameter counts come from the shapes alone (`GPTConfig.num_parameters()`), so we can size
# the big models without allocating them. OpenAI's models share the token embedding with the
# output head ("weight tying") and have qkv biases: 124,439,808 parameters for the small one.
# The book's chapter-4 model, with an untied head and no qkv bias, has 163,009,536.

# %%
print(f"{'model':<12} {'params':>15} {'float32 weights':>16} {'+ grads + AdamW':>16}")
for name in MODEL_SIZES:
    cfg = config_for(name)
    n = cfg.num_parameters()
    print(f"{name:<12} {n:>15,} {model_memory_bytes(cfg) / 2**20:>13,.1f} MB "
          f"{4 * model_memory_bytes(cfg) / 2**30:>13,.2f} GB")
book = config_for("gpt2-124m", qkv_bias=False, tie_embeddings=False)
print(f"book's GPTModel (untied, no qkv bias): {book.num_parameters():,}; "
      f"course run (context 256): {course_config().num_parameters():,}")
assert [config_for(n).num_parameters() for n in MODEL_SIZES] == \
    [124_439_808, 354_823_168, 774_030_080, 1_557_611_200]
assert book.num_parameters() == 163_009_536
assert book.replace(tie_embeddings=True).num_parameters() == 124_412_160   # the book's "with weight tying"

# %% [markdown]
# ## 7. Generating text
#
# Generation is a loop: run the model, take the logits of the last position, pick the most
# likely token (greedy), append it, repeat -- cropping the input to the context length. By hand,
# as the book's `generate_text_simple`:

# %%
def generate_text_simple(model, idx, max_new_tokens, context_size):
    for _ in range(max_new_tokens):
        with mg.no_grad():
            logits = model(idx[:, -context_size:]).numpy()     # (B, T, V)
        idx_next = logits[:, -1, :].argmax(axis=-1)             # (B,)
        idx = np.concatenate([idx, idx_next[:, None]], axis=1)
    return idx


tokenizer = get_tokenizer()
encoded = np.array([tokenizer.encode("Hello, I am")])
print("encoded:", encoded)
out = generate_text_simple(model, encoded, max_new_tokens=6, context_size=tiny.context_length)
print("by hand:", out, repr(tokenizer.decode(out[0])))

# The library's generate() gives the same greedy tokens, with or without the KV cache (which
# reuses the keys and values of earlier positions instead of recomputing them).
assert np.array_equal(generate(model, encoded, 6, use_cache=False), out)
assert np.array_equal(generate(model, encoded, 6, use_cache=True), out)
print("gpt2.generate agrees; the model is untrained, hence the gibberish")
