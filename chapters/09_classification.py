# %% [markdown]
# # Chapter 9: Fine-tuning for classification -- spam or not spam
#
# The book's chapter 6. A GPT predicts the next token out of 50,257; a classifier picks one of a
# few labels. The same network does both: keep the transformer, replace its output head by a
# small one with one output per class, read that head at the *last* token only, and train on
# labelled examples. Here the examples are SMS messages labelled "ham" (ordinary) or "spam".
#
# In this chapter:
#
# 1. the SMS Spam Collection: read, balanced, split 70/10/20 (inline, then the library);
# 2. padding every message with <|endoftext|> (50256) to one length;
# 3. the starting model, and a 2-class head in place of the 50,257-way one;
# 4. freezing: only the last block, the final layer norm and the head are trained;
# 5. the loss on the last token, and accuracy, by hand and from the library;
# 6. training with the library's `train()` and a loss function of our own;
# 7. train, validation and test accuracy, and classifying new messages.
#
# **Which model.** The book starts from OpenAI's GPT-2 124M and reaches 97.21% / 97.32% / 95.67%
# train / validation / test accuracy after 5 epochs: that is the target for those weights. They
# are used when they are here: `GPT2_PRETRAINED_DIR=DIR` (the Hugging Face layout), or GPT-2 124M
# in the cache, where chapter 06 downloads it (this chapter downloads nothing unless
# `GPT2_OFFLINE=0`). Without them the chapter starts from a small GPT of our own with random
# weights, says so, and the numbers it prints are that model's, not the book's. (On a CPU the
# book's run on GPT-2 124M is long: one training step took 20-27 s on this project's 2-core
# machine, so its 650 steps would take about 4 hours there; `MINIGRAD_BACKEND=cupy` on a GPU.)
#
# `GPT2_CHAPTER_QUICK=1 python chapters/09_classification.py` runs a tiny model for a few steps
# (the tests do this); `MINIGRAD_BACKEND=cupy` runs on a GPU.

# %%
import csv
import math
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import minigrad as mg
from gpt2 import GPT2Error, GPTConfig, GPTModel
from gpt2.finetune import (
    add_classifier_head,
    classification_loader,
    classification_loss,
    evaluate_classifier,
    finetune_file,
    freeze_for_classification,
    last_token_logits,
    load_spam_splits,
    set_dropout,
)
from gpt2.plot import plot_losses
from gpt2.pretrained import load_pretrained
from gpt2.tokenizer import get_tokenizer
from gpt2.train import TrainConfig, TrainState, make_optimizer, train
from minigrad import nn

QUICK = os.environ.get("GPT2_CHAPTER_QUICK", "") not in ("", "0")
mg.backend.tune_malloc()   # as `python -m gpt2` does: freed memory reused step after step
OUT = Path(os.environ.get("GPT2_CHAPTER_OUT", "runs/chapter09"))   # git-ignored
print(f"mode: {'quick' if QUICK else 'full'}, backend {mg.get_backend()}, output in {OUT}/")

# %% [markdown]
# ## 1. The data: read, balance, split
#
# The SMS Spam Collection (Almeida and Hidalgo, UCI repository) is one tab-separated line per
# message: `ham<TAB>text` or `spam<TAB>text`. `finetune_file("sms_spam")` downloads it once and
# checks its SHA-256; offline, its error says which file to fetch and where to put it.
#
# Spam is rare (13%), so a model that always says "ham" would already be 87% right. The book
# *balances* the classes first: it keeps a random 747 of the ham messages, as many as there are
# spam ones. Then it shuffles the 1,494 messages and cuts them 70% / 10% / 20% into training,
# validation and test sets. It does both with pandas (`df.sample(n, random_state=123)`), which
# draws `numpy.random.RandomState(123).permutation(n)`; the same call here picks the same
# messages in the same order.

# %%
path = finetune_file("sms_spam")
with open(path, encoding="utf-8", newline="") as f:
    rows = list(csv.reader(f, delimiter="\t"))   # quoting as pandas' read_csv: 5,572 messages
messages = [(1 if label == "spam" else 0, text) for label, text in rows]
ham = [m for m in messages if m[0] == 0]
spam = [m for m in messages if m[0] == 1]
print(f"{len(messages):,} messages: {len(ham):,} ham, {len(spam):,} spam")
keep = np.random.RandomState(123).permutation(len(ham))[:len(spam)]
balanced = [ham[i] for i in keep] + spam                       # the sampled ham, then all spam
order = np.random.RandomState(123).permutation(len(balanced))
shuffled = [balanced[i] for i in order]
n_train, n_val = int(len(shuffled) * 0.7), int(len(shuffled) * 0.1)
train_msgs = shuffled[:n_train]
val_msgs = shuffled[n_train:n_train + n_val]
test_msgs = shuffled[n_train + n_val:]
print(f"balanced: {len(balanced):,}; train {len(train_msgs)}, val {len(val_msgs)}, test {len(test_msgs)}")
print("first training message:", train_msgs[0])
assert (len(messages), len(spam)) == (5572, 747)
assert (len(train_msgs), len(val_msgs), len(test_msgs)) == (1045, 149, 300)

# %% [markdown]
# ## 2. One length for every message: padding with <|endoftext|>
#
# A batch is one array, so its messages must have the same number of tokens. The book pads each
# one with GPT-2's <|endoftext|> token (id 50256) to the length of the longest *training*
# message; validation and test messages longer than that are cut.

# %%
tokenizer = get_tokenizer()
PAD = tokenizer.eot_id
max_length = max(len(tokenizer.encode(text)) for _, text in train_msgs)


def pad(msgs):
    ids = [tokenizer.encode(text)[:max_length] for _, text in msgs]
    return np.array([row + [PAD] * (max_length - len(row)) for row in ids], dtype=np.int64)


train_ids, val_ids, test_ids = pad(train_msgs), pad(val_msgs), pad(test_msgs)
print(f"padded to {max_length} tokens (PAD = {PAD}); first row: {train_ids[0, :12].tolist()} ... "
      f"{train_ids[0, -4:].tolist()}")

# The library does all of the above in one call (gpt2/finetune/classify_data.py):
splits = load_spam_splits(tokenizer)
for ids, msgs, split in ((train_ids, train_msgs, splits.train), (val_ids, val_msgs, splits.val),
                         (test_ids, test_msgs, splits.test)):
    assert np.array_equal(split.ids, ids)
    assert split.labels.tolist() == [label for label, _ in msgs]
print(f"load_spam_splits: the same ids and labels; spam share in training {splits.train.labels.mean():.3f}")
assert max_length == splits.train.max_length == 120

# %% [markdown]
# Batches of 8, as the book: the training loader shuffles every epoch (seeded) and drops the
# incomplete last batch; validation and test keep every message.

# %%
BATCH = 8
train_loader = classification_loader(splits.train, BATCH, shuffle=True, drop_last=True, seed=123)
val_loader = classification_loader(splits.val, BATCH)
test_loader = classification_loader(splits.test, BATCH)
ids, labels = next(train_loader.batches())
print(f"batches: train {len(train_loader)}, val {len(val_loader)}, test {len(test_loader)}; "
      f"one batch: ids {ids.shape}, labels {labels.tolist()}")
assert (len(train_loader), len(val_loader), len(test_loader)) == (130, 19, 38)

# %% [markdown]
# ## 3. The starting model
#
# OpenAI's weights when they are here (see the top of the chapter), else a small GPT of our own
# with random weights: GPT-2's vocabulary and architecture, 4 blocks of width 128 (2 blocks of
# width 32 in quick mode). Random weights know nothing about language, so the frozen layers pass
# the last block features that were never trained -- expect it to fall well short of the book.
# The book fine-tunes without dropout; OpenAI's config says 0.1, so it is switched off here.

# %%
def starting_model():
    """OpenAI's GPT-2 (GPT2_PRETRAINED_DIR, or 124M from the cache), else a small random GPT."""
    name = os.environ.get("GPT2_PRETRAINED_DIR") or "gpt2"
    os.environ.setdefault("GPT2_OFFLINE", "1")   # no 548 MB download from here: chapter 06 does it
    try:
        model = load_pretrained(name)
    except GPT2Error as exc:
        print(f"OpenAI's weights are not here ({str(exc).split('. ')[0]}).\n"
              "Starting from a small GPT of OUR OWN with RANDOM weights instead: the accuracies below "
              "are that model's, not the book's.\n(Run chapters/06_pretrained.py once with network "
              "access to download GPT-2 124M, or set GPT2_PRETRAINED_DIR.)")
        small = dict(emb_dim=32, n_heads=2, n_layers=2) if QUICK else dict(emb_dim=128, n_heads=4, n_layers=4)
        mg.manual_seed(123)
        return GPTModel(GPTConfig(vocab_size=50257, context_length=256, dropout=0.0, qkv_bias=True,
                                  tie_embeddings=True, **small)), False
    set_dropout(model, 0.0)     # the book fine-tunes with drop_rate 0.0
    print(f"Starting from OpenAI's weights: {name}")
    return model, True


model, PRETRAINED = starting_model()
C = model.config.emb_dim
print(model.config)
print(f"{model.num_parameters():,} parameters")

# %% [markdown]
# ## 4. A 2-class head, and what to train
#
# GPT-2's head maps each position's C numbers to 50,257 logits (tied to the token embedding).
# A classifier needs 2: a new `Linear(C, 2)` with a bias, the book's `model.out_head =
# torch.nn.Linear(768, 2)`. The model then outputs (B, T, 2).
#
# Which weights to train? The lower blocks of a pretrained model compute general features of
# text; the book freezes them and trains only the last block, the final layer norm and the new
# head: far fewer gradients to compute and store, and a small data set cannot spoil what the
# frozen layers know. Freezing is `requires_grad_(False)`: a frozen parameter gets no .grad and
# the optimizer leaves it out.

# %%
mg.manual_seed(123)
model.head = nn.Linear(C, 2)             # (B, T, C) -> (B, T, 2)
model.requires_grad_(False)              # freeze everything ...
model.blocks[-1].requires_grad_(True)    # ... then unfreeze the last block,
model.ln_f.requires_grad_(True)          # the final norm
model.head.requires_grad_(True)          # and the head
inline_head = model.head.weight.numpy().copy()
inline_trainable = [n for n, _ in model.named_trainable_parameters()]

# The library's two calls do the same (the same seed draws the same head):
mg.manual_seed(123)
add_classifier_head(model, num_classes=2)
freeze_for_classification(model)
assert np.array_equal(model.head.weight.numpy(), inline_head)
assert [n for n, _ in model.named_trainable_parameters()] == inline_trainable
n_trainable = model.num_parameters(trainable_only=True)
groups = sorted({".".join(n.split(".")[:2 if n.startswith("blocks.") else 1]) for n in inline_trainable})
print(f"trainable: {n_trainable:,} of {model.num_parameters():,} parameters "
      f"({n_trainable / model.num_parameters():.1%}), in {', '.join(groups)}")

# %% [markdown]
# ## 5. The last token, the loss, and accuracy
#
# Attention is causal: position t sees tokens 0..t only. The last position is therefore the one
# whose output has seen the whole message, and the book classifies from its 2 logits. (Padding
# comes after the message, so the last position is usually a padding token; it still attends to
# every real token, and fine-tuning teaches it to gather what matters.)
#
# The loss is the cross-entropy of those 2 logits against the label: softmax, then
# -log p(label), averaged over the batch. Accuracy is the share of messages whose larger logit
# is the label. Before fine-tuning both are chance: a loss near ln 2 = 0.693, accuracy near 50%.

# %%
model.eval()
with mg.no_grad():
    logits = model(ids).numpy().astype(np.float64)               # (8, 120, 2)
last = logits[:, -1, :]                                          # (8, 2): the last token's logits
z = last - last.max(axis=1, keepdims=True)
log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))     # log softmax over the 2 classes
loss_by_hand = -log_probs[np.arange(len(labels)), labels].mean()
loss_lib = classification_loss(model, ids, labels).item()
print(f"logits {logits.shape}; last token's: {last[:2].round(3).tolist()} ...")
print(f"loss by hand {loss_by_hand:.5f}, classification_loss {loss_lib:.5f} (ln 2 = {math.log(2):.5f})")
assert np.allclose(loss_by_hand, loss_lib, rtol=1e-4)
with mg.no_grad():   # the library runs the final norm and head on the last position only
    assert np.allclose(last_token_logits(model, ids).numpy(), last, rtol=1e-4, atol=1e-5)


def accuracy_by_hand(loader, num_batches):
    correct = seen = 0
    with mg.no_grad():
        for i, (ids, labels) in enumerate(loader.batches()):
            if i == num_batches:
                break
            predicted = model(ids).numpy()[:, -1, :].argmax(axis=-1)
            correct += int((predicted == labels).sum())
            seen += len(labels)
    return correct / seen


N_ACC = 2 if QUICK else 10    # the book estimates on 10 batches before training
for name, loader in (("training", train_loader), ("validation", val_loader), ("test", test_loader)):
    acc = accuracy_by_hand(loader, N_ACC)
    _, acc_lib = evaluate_classifier(model, loader, max_batches=N_ACC)
    print(f"{name} accuracy before fine-tuning ({N_ACC} batches): {acc:.2%}")
    assert acc == acc_lib

# %% [markdown]
# ## 6. Training
#
# The book's `train_classifier_simple` is chapter 5's loop with this loss: zero the gradients,
# the loss of a batch, backward, an AdamW step, and every `eval_freq` steps the mean loss over
# `eval_iter` batches of each loader. `gpt2.train.train` is that loop, and takes the loss as
# `loss_fn(*batch, model)`; first a few steps of each from the same weights, to see that they
# agree.

# %%
def calc_loss_batch(ids, labels, model):
    logits = model(ids)[:, -1, :]            # (B, 2): the whole output, then its last position
    return mg.F.cross_entropy(logits, labels)


def calc_loss_loader(loader, model, num_batches):
    with mg.no_grad():
        batches = zip(loader.batches(), range(num_batches))
        losses = [calc_loss_batch(ids, labels, model).item() for (ids, labels), _ in batches]
    return sum(losses) / len(losses)


def train_classifier_simple(model, train_loader, val_loader, optimizer, eval_freq, eval_iter, max_steps):
    train_losses, val_losses, step = [], [], -1
    model.train()
    for ids, labels in train_loader:
        optimizer.zero_grad()
        loss = calc_loss_batch(ids, labels, model)
        loss.backward()
        optimizer.step()
        step += 1
        if step % eval_freq == 0:
            model.eval()
            train_losses.append(calc_loss_loader(train_loader, model, eval_iter))
            val_losses.append(calc_loss_loader(val_loader, model, eval_iter))
            model.train()
        if step + 1 == max_steps:
            return train_losses, val_losses


LR = 5e-5 if PRETRAINED else 1e-3   # the book's for OpenAI's weights; random weights need bigger steps
start = {n: p.data.copy() for n, p in model.named_trainable_parameters()}


def fresh_loader():
    return classification_loader(splits.train, BATCH, shuffle=True, drop_last=True, seed=123)


by_hand = train_classifier_simple(model, fresh_loader(), val_loader,
                                  make_optimizer(model, lr=LR), 1, 2, max_steps=3)
for n, p in model.named_trainable_parameters():   # back to the same starting weights
    p.data = start[n].copy()


def loss_fn(ids, labels, model):
    return classification_loss(model, ids, labels)


lib = train(model, fresh_loader(), val_loader, make_optimizer(model, lr=LR),
            TrainConfig(epochs=1, max_steps=3, eval_every=1, eval_iter=2, sample_prompt=None, progress=False),
            loss_fn=loss_fn, log=lambda line: None)
print("by hand:", [round(v, 5) for v in by_hand[0]], " train():", [round(v, 5) for v in lib.train_losses])
assert np.allclose(by_hand[0], lib.train_losses, rtol=1e-4)
assert np.allclose(by_hand[1], lib.val_losses, rtol=1e-4)
for n, p in model.named_trainable_parameters():
    p.data = start[n].copy()

# %% [markdown]
# The run: AdamW (weight decay 0.1) over the trainable parameters, 5 epochs of 130 batches,
# evaluation every 50 steps on 5 batches, as the book (whose lr of 5e-5 is for OpenAI's
# weights; the random model gets 1e-3). A hook prints the book's per-epoch accuracies on 5
# batches of each loader; `train` calls every hook after every step (`tqdm.write` prints above
# the progress bar).

# %%
EPOCHS, MAX_STEPS, EVAL_EVERY = (1, 12, 4) if QUICK else (5, None, 50)
optimizer = make_optimizer(model, lr=LR, weight_decay=0.1)
epoch_accuracies = []


def accuracy_each_epoch(state):
    if state.epoch > len(epoch_accuracies):   # the loader has just finished an epoch
        tr = evaluate_classifier(model, train_loader, max_batches=5)[1]
        va = evaluate_classifier(model, val_loader, max_batches=5)[1]
        epoch_accuracies.append((tr, va))
        tqdm.write(f"Epoch {state.epoch}: training accuracy {tr:.2%} | validation accuracy {va:.2%}")


state = TrainState()
t0 = time.perf_counter()
history = train(model, train_loader, val_loader, optimizer,
                TrainConfig(epochs=EPOCHS, max_steps=MAX_STEPS, eval_every=EVAL_EVERY, eval_iter=5,
                            eval_final=True, sample_prompt=None),
                state=state, loss_fn=loss_fn, hooks=[accuracy_each_epoch])
seconds = time.perf_counter() - t0
print(f"{state.step} steps, {state.tokens_seen:,} tokens in "
      f"{seconds:.0f} s; loss: train {history.train_losses[0]:.3f} -> {history.train_losses[-1]:.3f}, "
      f"val {history.val_losses[0]:.3f} -> {history.val_losses[-1]:.3f}")
assert history.train_losses[-1] < history.train_losses[0]
plot = plot_losses(history, OUT / "loss.png", title="spam classifier: loss")
print("saved", plot)

# %% [markdown]
# ## 7. Accuracy on every message
#
# Now on all of each split (`evaluate_classifier` with no batch limit). With OpenAI's 124M the
# book reaches 97.21% / 97.32% / 95.67% (train / validation / test): the target for those
# weights. The test set was not looked at during training; validation only for the printed
# losses. The small random model of the full mode reached 95.10% / 89.93% / 88.67% on this
# project's 2-core machine (NumPy, seed 123, 5 epochs at lr 1e-3: 650 steps in 309 s), and
# called the first message below "not spam".

# %%
accuracies = {}
for name, loader in (("training", train_loader), ("validation", val_loader), ("test", test_loader)):
    loss, acc = evaluate_classifier(model, loader)
    accuracies[name] = acc
    print(f"{name:10} accuracy {acc:7.2%}   loss {loss:.3f}")
which = f"OpenAI's weights ({os.environ.get('GPT2_PRETRAINED_DIR') or 'gpt2'})" if PRETRAINED else \
    "our small model, from random weights"
print(f"(the book, OpenAI's 124M: 97.21% / 97.32% / 95.67%; these are {which})")
if not QUICK and not PRETRAINED:
    assert accuracies["training"] > 0.8 and accuracies["test"] > 0.8, accuracies   # better than chance

# %% [markdown]
# Classifying a new message: tokenize, cut to the training length, pad, and take the larger of
# the last token's two logits (the book's `classify_review`).

# %%
def classify(text):
    row = tokenizer.encode(text)[:max_length]
    ids = np.array([row + [PAD] * (max_length - len(row))], dtype=np.int64)   # (1, 120)
    with mg.no_grad():
        label = int(last_token_logits(model.eval(), ids).numpy().argmax(axis=-1)[0])
    return "spam" if label == 1 else "not spam"


for text in ("You are a winner you have been specially selected to receive $1000 cash or a $2000 award.",
             "Hey, just wanted to check if we're still on for dinner tonight? Let me know!"):
    verdict = classify(text)
    print(f"{verdict:9} <- {text}")
    assert verdict in ("spam", "not spam")

# %% [markdown]
# The same fine-tuning from the command line (the book's settings, OpenAI's weights):
#
#     python -m gpt2 finetune classify
#
# Chapter 11 trains this classifier again with LoRA: the whole model frozen, a small low-rank
# update learned for each of its layers.
