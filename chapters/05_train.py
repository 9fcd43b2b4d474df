# %% [markdown]
# # Chapter 5: Pretraining on The Verdict
#
# The course run of *LLMs from Scratch*, chapter 5: a GPT-2 with the 124M shape (context 256,
# dropout 0.1, no qkv bias, untied output head) trained from random weights on one short story,
# Edith Wharton's *The Verdict* (20,479 characters, about 5,100 tokens), for 10 epochs with AdamW
# (lr 4e-4, weight decay 0.1), batch 2, seed 123, evaluating every 5 steps.
#
# What to expect: the loss starts at ln(50257) ≈ 10.8 (a uniform guess over the vocabulary),
# the training loss falls below 1 (the model memorises the story), and the validation loss stays
# far higher: with 5,000 tokens and 162M parameters the model overfits, which is the point of
# the exercise -- it shows the whole loop working, not a useful model. That comes with OpenAI's
# pretrained weights (chapter 06).
#
# On CPU the full run takes a while (90 steps of forward + backward + AdamW over 162M
# parameters). `GPT2_CHAPTER_QUICK=1 python chapters/05_train.py` runs a tiny model for a few
# steps instead (the tests do this); `MINIGRAD_BACKEND=cupy` runs on a GPU.

# %%
import math
import os
import time
from pathlib import Path

import numpy as np

import minigrad as mg
from gpt2 import GPTModel, course_config, generate
from gpt2.checkpoint import load_checkpoint, save_checkpoint
from gpt2.data import create_loaders, load_text
from gpt2.evaluate import calc_loss_batch, calc_loss_loader, evaluate_model
from gpt2.generate import next_token
from gpt2.model import pytorch_default_init_
from gpt2.plot import plot_losses
from gpt2.tokenizer import get_tokenizer
from gpt2.train import TrainConfig, TrainState, make_optimizer, train
from minigrad import functional as F

QUICK = os.environ.get("GPT2_CHAPTER_QUICK", "") not in ("", "0")
mg.backend.tune_malloc()   # as `python -m gpt2` does: freed memory reused step after step
OUT = Path(os.environ.get("GPT2_CHAPTER_OUT", "runs/chapter05"))   # git-ignored

if QUICK:   # a tiny model and a few steps: the same code path in seconds
    config = course_config(n_layers=2, n_heads=2, emb_dim=32, context_length=64)
    EPOCHS, MAX_STEPS, BATCH, LOSS_BATCHES = 1, 6, 2, 4
else:       # the course run
    config = course_config()
    EPOCHS, MAX_STEPS, BATCH, LOSS_BATCHES = 10, None, 2, None   # None: every batch
print(config)
print(f"mode: {'quick' if QUICK else 'full course run'}, backend {mg.get_backend()}, output in {OUT}/")

# %% [markdown]
# ## 1. An untrained model, and text <-> token ids
#
# Two helpers the book defines: text to a batch of one sequence of ids, and back. Generating
# from random weights gives random tokens -- the baseline that training has to beat.
#
# The starting weights matter here. `GPTModel` draws GPT-2's initialisation (every matrix and
# embedding normal(0, 0.02)); the book's model has no init of its own, so it starts from
# PyTorch's layer defaults: embeddings normal(0, 1), linear layers uniform(+-1/sqrt(fan_in)).
# With only 90 steps at a constant lr of 4e-4 that difference decides the run: from GPT-2's
# tiny embeddings the loss stalls near 6 (the model only learns which tokens are frequent),
# from the book's it memorises the story. So the course run re-draws the weights the book's way.
#
# Is that our engine's doing, or would PyTorch train the same way? `benchmarks/same_run.py`
# (needs torch) gives PyTorch this model's initial weights and the same batches, with dropout
# off -- dropout's masks come from each framework's own generator and cannot coincide -- and
# trains both 30 steps: on 2026-11-25 every one of the 30 losses agreed to within 9e-6 (largest
# difference 8.6e-6, at step 20). With dropout on, as below, the two can only agree in
# distribution, not step by step.

# %%
tokenizer = get_tokenizer()


def text_to_token_ids(text):
    return np.asarray(tokenizer.encode(text), dtype=np.int64)[None, :]   # (1, T)


def token_ids_to_text(ids):
    return tokenizer.decode(np.asarray(ids).reshape(-1))


mg.manual_seed(123)
model = GPTModel(config)
pytorch_default_init_(model)   # the book's starting point (`--init book` on the command line)
emb_std = float(model.tok_emb.weight.numpy().std())
print(f"token embedding std {emb_std:.3f}")
assert abs(emb_std - 1.0) < 0.05
start_context = "Every effort moves you"
ids = generate(model, text_to_token_ids(start_context), max_new_tokens=10)
print("untrained:", token_ids_to_text(ids))
assert token_ids_to_text(text_to_token_ids(start_context)) == start_context
print(f"{model.num_parameters():,} parameters")

# %% [markdown]
# ## 2. The loss, by hand
#
# For every position the model outputs logits over the 50,257 tokens; softmax turns them into
# probabilities, and the loss is the average of -log p(correct next token): cross-entropy.
# exp(loss) is the *perplexity*: how many tokens the model is, in effect, choosing between.
# An untrained model is close to uniform, so the loss is near ln(50257) ≈ 10.82.

# %%
inputs = np.array([[16833, 3626, 6100],     # "every effort moves"
                   [40, 1107, 588]])        # "I really like"
targets = np.array([[3626, 6100, 345],      # " effort moves you"
                    [1107, 588, 11311]])    # " really like chocolate"
model.eval()
with mg.no_grad():
    logits = model(inputs).numpy().astype(np.float64)          # (2, 3, 50257)
z = logits - logits.max(axis=-1, keepdims=True)
probas = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)    # softmax over the vocabulary
target_probas = np.take_along_axis(probas, targets[..., None], axis=-1)[..., 0]   # (2, 3)
loss_by_hand = -np.log(target_probas).mean()
loss_lib = F.cross_entropy(mg.Tensor(logits), targets).item()
print("p(target):", target_probas.round(7))
print(f"loss by hand {loss_by_hand:.4f}, F.cross_entropy {loss_lib:.4f}, "
      f"perplexity {math.exp(loss_lib):,.0f}, ln(50257) = {math.log(50257):.4f}")
assert np.allclose(loss_by_hand, loss_lib)
assert abs(loss_lib - math.log(50257)) < 1.5   # six tokens only: a rough estimate (section 4 uses all)

# %% [markdown]
# ## 3. The data: 90% for training, 10% for validation
#
# The split is by characters, then each part is cut into non-overlapping windows of 256 tokens
# (stride = context length). Training batches are shuffled and an incomplete last batch is
# dropped; validation keeps everything, in order.

# %%
text = load_text()   # The Verdict: data/the-verdict.txt, downloaded (and SHA-256 checked) once
train_loader, val_loader = create_loaders(text, batch_size=BATCH, max_length=config.context_length,
                                          seed=123, tokenizer=tokenizer)
print(f"characters: {len(text):,}, tokens: {len(tokenizer.encode(text)):,}")
print(f"train: {len(train_loader)} batches of {BATCH} x {config.context_length} tokens, "
      f"val: {len(val_loader)} batch(es)")
x, y = next(train_loader.batches())
print("one batch:", x.shape, y.shape)
assert (x[:, 1:] == y[:, :-1]).all()   # targets are the inputs shifted by one
if not QUICK:
    assert (len(train_loader), len(val_loader)) == (9, 1)   # as in the book: 4,608 and 512 tokens

# %% [markdown]
# ## 4. Loss before training
#
# `calc_loss_loader` averages the batch losses over a loader (with no graph kept). Both are near
# ln(50257): the model knows nothing yet.

# %%
train_loss0 = calc_loss_loader(train_loader, model, LOSS_BATCHES)
val_loss0 = calc_loss_loader(val_loader, model, LOSS_BATCHES)
print(f"before training: train loss {train_loss0:.3f}, val loss {val_loss0:.3f}")
assert abs(train_loss0 - math.log(50257)) < 0.5 and abs(val_loss0 - math.log(50257)) < 0.5

# %% [markdown]
# ## 5. Training
#
# The book's `train_model_simple`, written out: for each batch, zero the gradients, compute the
# loss, backpropagate, take an AdamW step; every `eval_freq` steps print the mean loss over
# `eval_iter` batches of each loader; after each epoch continue a prompt greedily. (`max_steps`
# is ours, to try it for a few steps.)

# %%
def train_model_simple(model, train_loader, val_loader, optimizer, num_epochs, eval_freq, eval_iter,
                       start_context, tokenizer, max_steps=None):
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.size
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(f"Ep {epoch + 1} (Step {global_step:06d}): "
                      f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
            if max_steps is not None and global_step + 1 == max_steps:
                return train_losses, val_losses, track_tokens_seen
        print(generate_text(model, tokenizer, start_context))
    return train_losses, val_losses, track_tokens_seen


def generate_text(model, tokenizer, start_context, max_new_tokens=50):
    model.eval()
    ids = np.asarray(tokenizer.encode(start_context), dtype=np.int64)[None, :]
    text = tokenizer.decode(generate(model, ids, max_new_tokens)[0]).replace("\n", " ")
    model.train()
    return text


# %% [markdown]
# `gpt2.train.train` is this loop, with the extras a longer run needs named in it and off by
# default (gradient accumulation, a learning-rate schedule, clipping, a NaN guard, data
# parallelism, a progress bar; gpt2/train_extras.py). From the same weights, the same batches and
# the same dropout masks, three steps of each give the same losses, bit for bit:

# %%
def copy_of(model):
    twin = GPTModel(model.config)
    twin.load_state_dict(model.state_dict())
    return twin


def fresh_loaders():
    return create_loaders(text, batch_size=BATCH, max_length=config.context_length, seed=123,
                          tokenizer=tokenizer)


mg.manual_seed(7)
book_model = copy_of(model)
by_hand = train_model_simple(book_model, *fresh_loaders(), make_optimizer(book_model), num_epochs=1,
                             eval_freq=1, eval_iter=2, start_context=start_context, tokenizer=tokenizer,
                             max_steps=3)
mg.manual_seed(7)
lib_model = copy_of(model)
lib = train(lib_model, *fresh_loaders(), make_optimizer(lib_model),
            TrainConfig(epochs=1, max_steps=3, eval_every=1, eval_iter=2, sample_prompt=None, progress=False))
assert by_hand[0] == lib.train_losses and by_hand[1] == lib.val_losses and by_hand[2] == lib.tokens_seen
print("the library's loop: the same", len(lib.train_losses), "train and validation losses")
del book_model, lib_model

# %% [markdown]
# The course run: 10 epochs, evaluation every 5 steps on 5 batches, a sample after each epoch.
# AdamW's weight decay of 0.1 applies to every parameter, as in the book.

# %%
mg.manual_seed(123)   # dropout masks from here on are reproducible
optimizer = make_optimizer(model, lr=4e-4, weight_decay=0.1)
state = TrainState()
t0 = time.perf_counter()
history = train(model, train_loader, val_loader, optimizer,
                TrainConfig(epochs=EPOCHS, max_steps=MAX_STEPS, eval_every=5, eval_iter=5,
                            sample_prompt=start_context),
                tokenizer=tokenizer, state=state)
minutes = (time.perf_counter() - t0) / 60
print(f"trained {state.step} steps, {state.tokens_seen:,} tokens in {minutes:.1f} min "
      f"({state.tokens_seen / (minutes * 60):,.0f} tokens/s)")
print(f"final: train loss {history.train_losses[-1]:.3f}, val loss {history.val_losses[-1]:.3f}")
if not QUICK:   # memorised the story, and does not generalise from it
    assert history.train_losses[-1] < 1.0, history.train_losses[-1]
    assert history.val_losses[-1] > history.train_losses[-1] + 3.0

# %% [markdown]
# ## 6. The loss plot
#
# Training loss keeps falling; validation loss flattens after a couple of epochs and then
# creeps up: overfitting.

# %%
plot = plot_losses(history, OUT / "loss.png", title="GPT-2 124M shape on The Verdict")
print("saved", plot)
assert plot.stat().st_size > 0

# %% [markdown]
# ## 7. Decoding: temperature and top-k
#
# Greedy decoding always picks the most likely token, so the same prompt always gives the same
# text. Sampling draws from softmax(logits / T) instead: T < 1 sharpens the distribution
# (towards greedy), T > 1 flattens it (more surprising, eventually nonsense). Top-k first keeps
# only the k most likely tokens, cutting off the long tail of unlikely ones.
#
# The book's toy example: a vocabulary of 9 words and the logits after "every effort moves you".

# %%
vocab = ["closer", "every", "effort", "forward", "inches", "moves", "pizza", "toward", "you"]
next_token_logits = np.array([4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79])


def softmax_with_temperature(logits, temperature):
    z = logits / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


rng = np.random.default_rng(123)
for T in (1.0, 0.1, 5.0):
    p = softmax_with_temperature(next_token_logits, T)
    picks = next_token(np.tile(next_token_logits, (1000, 1)), temperature=T, rng=rng)   # 1000 draws
    counts = np.bincount(picks, minlength=len(vocab))
    print(f"T={T}: " + ", ".join(f"{w} {c}" for w, c in zip(vocab, counts) if c))
    assert np.allclose(counts / 1000, p, atol=0.06)   # the sampler draws from softmax(z / T)

# top-k = 3 by hand: everything below the 3rd largest logit becomes -inf, then softmax.
top3 = np.sort(next_token_logits)[-3:]
masked = np.where(next_token_logits < top3[0], -np.inf, next_token_logits)
p_top3 = softmax_with_temperature(masked, 1.0)
print("top-3 probabilities:", {w: round(float(q), 4) for w, q in zip(vocab, p_top3) if q > 0})
picks = next_token(np.tile(next_token_logits, (1000, 1)), temperature=1.0, top_k=3, rng=rng)
assert set(picks.tolist()) <= set(np.flatnonzero(p_top3 > 0).tolist())
assert np.allclose(np.bincount(picks, minlength=9) / 1000, p_top3, atol=0.06)
assert next_token(next_token_logits[None], temperature=0.0)[0] == next_token_logits.argmax()   # greedy

# %% [markdown]
# The same options on the trained model: greedy twice gives the same text, sampling varies with
# the seed (and the same seed repeats it).

# %%
prompt_ids = text_to_token_ids(start_context)
greedy = token_ids_to_text(generate(model, prompt_ids, max_new_tokens=15))
print("greedy:           ", greedy)
for seed in (1, 2):
    sampled = generate(model, prompt_ids, max_new_tokens=15, temperature=1.4, top_k=25, seed=seed)
    print(f"T=1.4 top-k 25 (seed {seed}):", token_ids_to_text(sampled))
again = generate(model, prompt_ids, max_new_tokens=15, temperature=1.4, top_k=25, seed=2)
assert (again == sampled).all()
assert token_ids_to_text(generate(model, prompt_ids, max_new_tokens=15)) == greedy

# %% [markdown]
# ## 8. Save, reload, generate
#
# A checkpoint is a directory: config.json, model.safetensors, optimizer.safetensors (AdamW's
# moments) and trainer_state.json (step, epoch, tokens seen, the random generator's state). The
# reloaded model has exactly the same bytes, so it generates exactly the same text.

# %%
ckpt_dir = save_checkpoint(OUT / "checkpoint", model, optimizer,
                           state={**vars(state), "loader": train_loader.state_dict(),
                                  "history": history.to_dict()})
print("saved", sorted(p.name for p in ckpt_dir.iterdir()))
ckpt = load_checkpoint(ckpt_dir)
same = all(np.array_equal(mg.to_numpy(a), mg.to_numpy(b))
           for a, b in zip(model.state_dict().values(), ckpt.model.state_dict().values()))
print("reloaded weights identical:", same)
assert same and ckpt.config == config and ckpt.optimizer_state["step"] == state.step
reloaded_text = token_ids_to_text(generate(ckpt.model, prompt_ids, max_new_tokens=15))
print("reloaded greedy:  ", reloaded_text)
assert reloaded_text == greedy
print(f"\nTry it from the command line:\n  python -m gpt2 generate --checkpoint {ckpt_dir} "
      f'--prompt "{start_context}" --temperature 1.4 --top-k 25 --seed 1')
