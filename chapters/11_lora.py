# %% [markdown]
# # Chapter 11: LoRA -- fine-tuning with a low-rank update
#
# The book's appendix E. Chapter 09 trained the last block of the classifier and froze the
# rest. LoRA (Hu et al., 2021) freezes *every* pretrained weight and learns, for each linear
# layer, a small correction instead:
#
#     y = x W^T + b + (alpha / r) (x A) B,      A (in, r),  B (r, out)
#
# The weight update that is learned, (alpha / r) (A B)^T, has rank r. With r = 16 a 768 x 3072
# layer trains 16 (768 + 3072) = 61,440 numbers instead of 2,359,296. B starts at zero, so the
# adapted model starts out as exactly the pretrained one; A starts random, so the gradient that
# reaches B is not zero and learning can begin. After training, A B is folded into W and the
# model is a plain one again, as fast as before.
#
# In this chapter:
#
# 1. a LoRA layer written inline (A, B, alpha / r, B = 0) and the library's `LoRALinear`: same
#    outputs and gradients, and the low-rank update's backward checked by finite differences;
# 2. parameter counts: GPT-2 124M as a classifier, everything frozen, LoRA in every linear layer;
# 3. chapter 09's spam classifier trained again with LoRA;
# 4. merging the update into the weights: the same logits, a plain model.
#
# Which model: as chapter 09, OpenAI's GPT-2 when its weights are here (`GPT2_PRETRAINED_DIR`, or
# 124M in the cache where chapter 06 downloads it), else a small GPT of our own with random weights,
# and the chapter says which. `GPT2_CHAPTER_QUICK=1` runs a tiny model for a few steps (the tests
# do this); `MINIGRAD_BACKEND=cupy` runs on a GPU.

# %%
import math
import os
import time

import numpy as np

import minigrad as mg
from gpt2 import GPT2Error, GPTConfig, GPTModel, gpt2_124m
from gpt2.finetune import (
    add_classifier_head,
    classification_loader,
    classification_loss,
    evaluate_classifier,
    last_token_logits,
    load_spam_splits,
    set_dropout,
)
from gpt2.model import build_uninitialised
from gpt2.pretrained import load_pretrained
from gpt2.tokenizer import get_tokenizer
from gpt2.train import TrainConfig, TrainState, make_optimizer, train
from minigrad import Tensor, gradcheck, nn
from minigrad.lora import LoRALinear, apply_lora, low_rank_update, merge_lora

QUICK = os.environ.get("GPT2_CHAPTER_QUICK", "") not in ("", "0")
mg.backend.tune_malloc()   # as `python -m gpt2` does: freed memory reused step after step
print(f"mode: {'quick' if QUICK else 'full'}, backend {mg.get_backend()}")

# %% [markdown]
# ## 1. A LoRA layer, inline
#
# The book's two classes: `LoRALayer` computes (alpha / r) (x A) B; `LinearWithLoRA` adds it to
# a frozen Linear. A is drawn uniform in +-1/sqrt(r) (what PyTorch's `kaiming_uniform_(a=sqrt(5))`
# gives an (in, r) matrix), B is zero.

# %%
class LoRALayer(nn.Module):
    def __init__(self, in_dim, out_dim, rank, alpha, rng):
        bound = 1 / math.sqrt(rank)
        self.A = nn.Parameter(rng.uniform(-bound, bound, (in_dim, rank)))
        self.B = nn.Parameter(np.zeros((rank, out_dim)))
        self.alpha, self.rank = alpha, rank

    def forward(self, x):
        return (x @ self.A @ self.B) * (self.alpha / self.rank)


class LinearWithLoRA(nn.Module):
    def __init__(self, linear, rank, alpha, rng):
        self.linear = linear
        out_dim, in_dim = linear.weight.shape
        self.lora = LoRALayer(in_dim, out_dim, rank, alpha, rng)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


mg.set_default_dtype(np.float64)   # float64 for this section, so finite differences are exact enough
mg.manual_seed(0)
rng = np.random.default_rng(0)
linear = nn.Linear(8, 6)
linear.requires_grad_(False)                       # the pretrained weight: frozen
inline = LinearWithLoRA(linear, rank=2, alpha=4, rng=rng)
x = Tensor(rng.standard_normal((2, 3, 8)))
same = np.array_equal(inline(x).numpy(), linear(x).numpy())
print(f"B = 0: the adapted layer computes exactly the frozen one: {same}")
assert same
print("trainable:", [(n, p.shape) for n, p in inline.named_trainable_parameters()])

# %% [markdown]
# The library's `LoRALinear` is the same layer, with the update as one op whose backward is
# derived by hand (four small matmuls: every product goes through the rank r). Given the same A
# and a B as if trained, both give the same output and the same gradients; the composed inline
# version gets its gradients from autograd.

# %%
lib = LoRALinear.from_linear(linear, rank=2, alpha=4)   # shares W and b with `linear`
lib.lora_A.data = inline.lora.A.data.copy()
B_trained = rng.standard_normal((2, 6))
inline.lora.B.data = mg.backend.asarray(B_trained)
lib.lora_B.data = mg.backend.asarray(B_trained)
upstream = rng.standard_normal((2, 3, 6))
for layer in (inline, lib):
    layer(x).backward(mg.backend.asarray(upstream))
pairs = {"A": (inline.lora.A, lib.lora_A), "B": (inline.lora.B, lib.lora_B)}
assert np.allclose(inline(x).numpy(), lib(x).numpy(), rtol=1e-12)
for name, (a, b) in pairs.items():
    print(f"dL/d{name}: largest difference {np.abs(mg.to_numpy(a.grad) - mg.to_numpy(b.grad)).max():.1e}")
    assert np.allclose(mg.to_numpy(a.grad), mg.to_numpy(b.grad), rtol=1e-10)
assert linear.weight.grad is None                        # the frozen weight got no gradient

# The hand-derived backward against central finite differences, for x, A and B at once:
xs = Tensor(rng.standard_normal((2, 3, 8)), requires_grad=True)
A = Tensor(rng.standard_normal((8, 2)), requires_grad=True)
B = Tensor(rng.standard_normal((2, 6)), requires_grad=True)
assert gradcheck(lambda xs, A, B: low_rank_update(xs, A, B, 2.0), xs, A, B)
print("gradcheck of low_rank_update (x, A, B): passed")
mg.set_default_dtype(np.float32)

# %% [markdown]
# ## 2. How many parameters LoRA trains
#
# GPT-2 124M with chapter 09's 2-class head has 124,441,346 parameters. Freeze them all and put
# LoRA (r = 16, alpha = 16) in every linear layer: the attention's qkv and output projections,
# the MLP's two layers, and the head. Counted on the real shape; the weights are not needed
# (`build_uninitialised` allocates placeholders, not 124M random numbers).
#
# The book counts 2,666,528 trainable numbers. Ours is lower because our attention computes
# queries, keys and values with *one* Linear (768 -> 2304), where the book has three (768 -> 768
# each): one A, B pair of 16 (768 + 2304) = 49,152 numbers instead of three of 16 (768 + 768),
# 73,728 -- per block, 24,576 fewer.

# %%
shape = build_uninitialised(gpt2_124m())
add_classifier_head(shape, num_classes=2)
total = shape.num_parameters()
shape.requires_grad_(False)
apply_lora(shape, rank=16, alpha=16)
lora_params = shape.num_parameters(trainable_only=True)
per_block = 16 * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768))
print(f"GPT-2 124M classifier: {total:,} parameters, all frozen; LoRA r=16 trains {lora_params:,} "
      f"({lora_params / total:.2%})")
assert total == 124_441_346
assert lora_params == 12 * per_block + 16 * (768 + 2) == 2_371_616
book = 12 * 16 * (4 * (768 + 768) + (768 + 3072) + (3072 + 768)) + 16 * (768 + 2)
assert book == 2_666_528   # three separate q, k, v layers, as the book's model has
del shape

# %% [markdown]
# ## 3. Chapter 09's classifier, trained with LoRA
#
# The same data, the same starting model and the same 2-class head as chapter 09; then the
# whole model frozen and `apply_lora(model, rank=16, alpha=16)`. The head itself is new and
# random, and frozen too: LoRA's update on it is what learns.

# %%
tokenizer = get_tokenizer()
splits = load_spam_splits(tokenizer)
BATCH = 8
train_loader = classification_loader(splits.train, BATCH, shuffle=True, drop_last=True, seed=123)
val_loader = classification_loader(splits.val, BATCH)
test_loader = classification_loader(splits.test, BATCH)


def starting_model():
    """OpenAI's GPT-2 (GPT2_PRETRAINED_DIR, or 124M from the cache), else a small random GPT."""
    name = os.environ.get("GPT2_PRETRAINED_DIR") or "gpt2"
    os.environ.setdefault("GPT2_OFFLINE", "1")   # no 548 MB download from here: chapter 06 does it
    try:
        model = load_pretrained(name)
    except GPT2Error as exc:
        print(f"OpenAI's weights are not here ({str(exc).split('. ')[0]}).\n"
              "Starting from a small GPT of OUR OWN with RANDOM weights instead: the accuracies below "
              "are that model's, not the book's.")
        small = dict(emb_dim=32, n_heads=2, n_layers=2) if QUICK else dict(emb_dim=128, n_heads=4, n_layers=4)
        mg.manual_seed(123)
        return GPTModel(GPTConfig(vocab_size=50257, context_length=256, dropout=0.0, qkv_bias=True,
                                  tie_embeddings=True, **small)), False
    set_dropout(model, 0.0)     # the book fine-tunes with drop_rate 0.0
    print(f"Starting from OpenAI's weights: {name}")
    return model, True


model, PRETRAINED = starting_model()
mg.manual_seed(123)
add_classifier_head(model, num_classes=2)
n_before = model.num_parameters()
model.requires_grad_(False)
mg.manual_seed(123)
apply_lora(model, rank=16, alpha=16)
n_lora = model.num_parameters(trainable_only=True)
print(f"{n_before:,} parameters frozen; LoRA adds {n_lora:,} trainable ({n_lora / n_before:.2%})")
print("adapted layers:", sum(isinstance(m, LoRALinear) for m in model.modules()))
assert all(".lora_" in n for n, _ in model.named_trainable_parameters())
ids, labels = next(val_loader.batches())
with mg.no_grad():
    start_logits = last_token_logits(model.eval(), ids).numpy()

# %% [markdown]
# The book's appendix E: AdamW (lr 5e-5, weight decay 0.1), 5 epochs, evaluation every 50 steps
# on 5 batches. The random model gets lr 1e-3 and, in the full mode, 2 epochs (on this
# project's 2-core machine, NumPy, seed 123: 260 steps in 123 s, then 89.33% / 88.59% / 87.00%
# train / validation / test accuracy, against chapter 09's 95.10% / 89.93% / 88.67% from
# training the last block, 198,786 parameters against LoRA's 133,152). Gradients now flow
# back through every block (each has A's and B's to train), but weight gradients are
# computed for the small matrices only.

# %%
LR = 5e-5 if PRETRAINED else 1e-3
EPOCHS, MAX_STEPS, EVAL_EVERY = (1, 10, 5) if QUICK else ((5, None, 50) if PRETRAINED else (2, None, 50))
N_ACC = 2 if QUICK else None   # batches for accuracy (None: all)
print("before: " + ", ".join(f"{name} accuracy {evaluate_classifier(model, loader, N_ACC)[1]:.2%}"
                             for name, loader in (("training", train_loader), ("validation", val_loader))))
optimizer = make_optimizer(model, lr=LR, weight_decay=0.1)   # frozen parameters are left out
state = TrainState()
t0 = time.perf_counter()
history = train(model, train_loader, val_loader, optimizer,
                TrainConfig(epochs=EPOCHS, max_steps=MAX_STEPS, eval_every=EVAL_EVERY, eval_iter=5,
                            eval_final=True, sample_prompt=None),
                loss_fn=lambda ids, labels, model: classification_loss(model, ids, labels), state=state)
print(f"{state.step} steps in {time.perf_counter() - t0:.0f} s; loss: train {history.train_losses[0]:.3f} -> "
      f"{history.train_losses[-1]:.3f}, val {history.val_losses[0]:.3f} -> {history.val_losses[-1]:.3f}")
assert history.train_losses[-1] < history.train_losses[0]
accuracies = {}
for name, loader in (("training", train_loader), ("validation", val_loader), ("test", test_loader)):
    accuracies[name] = evaluate_classifier(model, loader, N_ACC)[1]
    print(f"{name:10} accuracy {accuracies[name]:7.2%}")
if not QUICK and not PRETRAINED:
    assert accuracies["training"] > 0.8 and accuracies["test"] > 0.8, accuracies   # better than chance

# %% [markdown]
# ## 4. Merging: W <- W + (alpha / r) (A B)^T
#
# For inference the two paths can become one: add the learned update into each weight and put
# a plain Linear back (`merge_lora`). The logits stay the same up to float32 rounding, the state
# dict has exactly the base model's names again, and the model costs nothing extra to run.

# %%
with mg.no_grad():
    before = last_token_logits(model.eval(), ids).numpy()
merge_lora(model)
with mg.no_grad():
    after = last_token_logits(model, ids).numpy()
print(f"logits of {len(ids)} validation messages: changed by training by up to "
      f"{np.abs(before - start_logits).max():.3f}; merged vs unmerged, largest difference "
      f"{np.abs(after - before).max():.1e}")
assert np.allclose(after, before, rtol=1e-4, atol=1e-4)
assert not any(isinstance(m, LoRALinear) for m in model.modules())
assert model.num_parameters() == n_before and not any("lora" in n for n in model.state_dict())
merged_acc = evaluate_classifier(model, test_loader, N_ACC)[1]
n_test = len(splits.test) if N_ACC is None else N_ACC * BATCH
print(f"test accuracy after merging: {merged_acc:.2%}")
assert abs(merged_acc - accuracies["test"]) <= 1 / n_test   # rounding may flip a near-tie, at most

# %% [markdown]
# Fine-tuning from the command line: `python -m gpt2 finetune classify` runs chapter 09's
# classification in full (`--help` lists its options).
