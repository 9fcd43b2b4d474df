# %% [markdown]
# # Chapter 10: Fine-tuning to follow instructions
#
# The book's chapter 7. A pretrained GPT continues text; it does not answer. To make it answer,
# train it on examples of an instruction followed by a good response, laid out the same way
# every time, so that after "### Response:" it has learned to write the answer and then stop.
# The loss is chapter 05's next-token cross-entropy; what is new is the data: a prompt format,
# batches of examples of different lengths, and which targets count.
#
# In this chapter:
#
# 1. the book's 1,100 instructions, and the Alpaca prompt format (inline, then the library);
# 2. the split: 935 training, 55 validation and 110 test entries;
# 3. the collate function: pad with <|endoftext|> (50256), shift for the targets, and turn every
#    padding target but the first into -100, which the loss ignores;
# 4. the starting model;
# 5. masked targets carry no gradient (checked on the model's logits);
# 6. a short fine-tuning run whose loss falls, with the library's `train()`;
# 7. answers to test instructions: greedy, stopping at <|endoftext|>;
# 8. a checkpoint that `python -m gpt2 chat` prompts in the Alpaca format.
#
# **Which model.** The book fine-tunes OpenAI's GPT-2 355M for 2 epochs; its answers are then
# mostly sensible. OpenAI's weights are used here when they are present (`GPT2_PRETRAINED_DIR=DIR`,
# e.g. gpt2-medium in the Hugging Face layout, or GPT-2 124M in the cache where chapter 06
# downloads it; nothing is downloaded unless `GPT2_OFFLINE=0`). Without them the chapter trains
# a small GPT of our own from random weights, says so, and learns the layout long before any
# knowledge: expect a few words in the style of the answers, ended where an answer ends, and
# nothing correct. (With OpenAI's weights a CPU takes far longer: every weight is trained, and
# one step of chapter 09's classifier, which trains only the last block of GPT-2 124M, already
# took 20-27 s on this project's 2-core machine.)
#
# `GPT2_CHAPTER_QUICK=1 python chapters/10_instruction.py` runs a tiny model for a few steps
# (the tests do this); `MINIGRAD_BACKEND=cupy` runs on a GPU.

# %%
import math
import os
import time
from pathlib import Path

import numpy as np

import minigrad as mg
from gpt2 import GPT2Error, GPTConfig, GPTModel, generate
from gpt2.chat import ALPACA, template_of_checkpoint
from gpt2.checkpoint import load_model, save_checkpoint
from gpt2.finetune import (
    InstructionDataset,
    collate_instructions,
    format_input,
    instruction_loader,
    load_instruction_data,
    split_instruction_data,
)
from gpt2.plot import plot_losses
from gpt2.pretrained import load_pretrained
from gpt2.tokenizer import get_tokenizer
from gpt2.train import TrainConfig, TrainState, make_optimizer, train
from minigrad import F, nn

QUICK = os.environ.get("GPT2_CHAPTER_QUICK", "") not in ("", "0")
mg.backend.tune_malloc()   # as `python -m gpt2` does: freed memory reused step after step
OUT = Path(os.environ.get("GPT2_CHAPTER_OUT", "runs/chapter10"))   # git-ignored
print(f"mode: {'quick' if QUICK else 'full'}, backend {mg.get_backend()}, output in {OUT}/")

# %% [markdown]
# ## 1. The instructions, and the Alpaca prompt
#
# 1,100 entries, each an `instruction`, an optional `input` and the `output` to learn
# (`load_instruction_data` downloads the book's file once and checks its SHA-256). The book lays
# each one out as Stanford's Alpaca did: a fixed preamble, the instruction, the input if there
# is one, then the response.

# %%
data = load_instruction_data()
print(f"{len(data):,} entries; one of them: {data[50]}")
assert len(data) == 1100


def format_input_by_hand(entry):
    instruction_text = ("Below is an instruction that describes a task. "
                        "Write a response that appropriately completes the request."
                        f"\n\n### Instruction:\n{entry['instruction']}")
    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
    return instruction_text + input_text


print("-" * 40)
print(format_input_by_hand(data[50]) + f"\n\n### Response:\n{data[50]['output']}")
print("-" * 40)
print(format_input_by_hand(data[999]) + f"\n\n### Response:\n{data[999]['output']}")   # no input
print("-" * 40)
assert all(format_input_by_hand(e) == format_input(e) for e in data)   # the library's, for all 1,100

# %% [markdown]
# ## 2. Training, validation and test entries
#
# In file order, as the book: the first 85% for training, the next 10% for testing, the last 5%
# for validation.

# %%
train_portion = int(len(data) * 0.85)
test_portion = int(len(data) * 0.1)
train_data = data[:train_portion]
test_data = data[train_portion:train_portion + test_portion]
val_data = data[train_portion + test_portion:]
print(f"train {len(train_data)}, validation {len(val_data)}, test {len(test_data)}")
assert (len(train_data), len(val_data), len(test_data)) == (935, 55, 110)
assert split_instruction_data(data) == (train_data, val_data, test_data)

# %% [markdown]
# ## 3. Batches: pad, shift, and ignore the padding
#
# Every example is prompt + response as one token sequence, and they differ in length. The
# book's collate function makes a batch of them:
#
# * append one <|endoftext|> (50256) to each, so that the model learns to end its answer;
# * pad them all with 50256 to the batch's longest (plus that one), so T changes from batch to
#   batch instead of every batch being padded to the longest example of the data set;
# * inputs are all tokens but the last, targets all but the first: position t predicts token
#   t + 1, as in pretraining;
# * every padding target but the first becomes -100, the index the cross-entropy skips: the
#   model is taught to write one <|endoftext|> and nothing about what comes after it.
#
# Small first, with the book's three toy examples.

# %%
def custom_collate_fn(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None):
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = item + [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = np.array(padded[:-1])
        targets = np.array(padded[1:])
        pads = np.flatnonzero(targets == pad_token_id)
        if len(pads) > 1:
            targets[pads[1:]] = ignore_index        # every padding target but the first
        if allowed_max_length is not None:
            inputs, targets = inputs[:allowed_max_length], targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return np.stack(inputs_lst), np.stack(targets_lst)


toy = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
inputs, targets = custom_collate_fn(toy)
print("inputs:\n", inputs, "\ntargets:\n", targets)
assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
lib_inputs, lib_targets = collate_instructions(toy)
assert np.array_equal(lib_inputs, inputs) and np.array_equal(lib_targets, targets)

# %% [markdown]
# Why -100 works: the cross-entropy averages -log p(target) over the targets that are not -100
# only, so a -100 target changes nothing at all. The book's example: two rows give 1.1269; a
# third row adds to the mean; the same third row with target -100 gives 1.1269 again.

# %%
logits_2 = mg.Tensor([[-1.0, 1.0], [-0.5, 1.5], [-0.5, 1.5]])
loss_2 = F.cross_entropy(logits_2[:2], np.array([0, 1])).item()
loss_3 = F.cross_entropy(logits_2, np.array([0, 1, 1])).item()
loss_ignored = F.cross_entropy(logits_2, np.array([0, 1, -100])).item()
print(f"two rows {loss_2:.4f}; three rows {loss_3:.4f}; three rows, the third -100: {loss_ignored:.4f}")
assert math.isclose(loss_2, loss_ignored, rel_tol=1e-6) and round(loss_2, 4) == 1.1269

# %% [markdown]
# The real examples: prompt + "\n\n### Response:\n" + output, tokenized once
# (`InstructionDataset`); the library's loader collates each batch as above. The inline
# function gives the same batch.

# %%
tokenizer = get_tokenizer()
examples = [tokenizer.encode(format_input(e) + f"\n\n### Response:\n{e['output']}") for e in train_data]
lengths = [len(e) for e in examples]
print(f"training examples: {min(lengths)} to {max(lengths)} tokens, mean {np.mean(lengths):.0f}")
dataset = InstructionDataset(train_data, tokenizer)
assert dataset.examples == examples
index = np.arange(8)
inputs, targets = custom_collate_fn([examples[i] for i in index])
lib_inputs, lib_targets = dataset.batch(index)
assert np.array_equal(lib_inputs, inputs) and np.array_equal(lib_targets, targets)
print(f"first batch: inputs {inputs.shape}, {(targets == -100).sum()} of {targets.size} targets ignored")

# %% [markdown]
# ## 4. The starting model
#
# OpenAI's weights when present (see the top), else a small GPT of our own, random: GPT-2's
# vocabulary and architecture, 4 blocks of width 128, context 256 (2 blocks of width 32, context
# 128 in quick mode). Batches are cut to the model's context. The book trains without dropout.

# %%
def starting_model():
    """OpenAI's GPT-2 (GPT2_PRETRAINED_DIR, or 124M from the cache), else a small random GPT."""
    name = os.environ.get("GPT2_PRETRAINED_DIR") or "gpt2"
    os.environ.setdefault("GPT2_OFFLINE", "1")   # no 548 MB download from here: chapter 06 does it
    try:
        model = load_pretrained(name)
    except GPT2Error as exc:
        print(f"OpenAI's weights are not here ({str(exc).split('. ')[0]}).\n"
              "Training a small GPT of OUR OWN from RANDOM weights instead: it learns the format long "
              "before any knowledge.\n(Run chapters/06_pretrained.py once with network access to "
              "download GPT-2 124M, or set GPT2_PRETRAINED_DIR.)")
        small = dict(emb_dim=32, n_heads=2, n_layers=2, context_length=128) if QUICK else \
            dict(emb_dim=128, n_heads=4, n_layers=4, context_length=256)
        mg.manual_seed(123)
        return GPTModel(GPTConfig(vocab_size=50257, dropout=0.0, qkv_bias=True, tie_embeddings=True,
                                  **small)), False
    for m in model.modules():   # the book fine-tunes with drop_rate 0.0
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_p"):
            m.dropout_p = 0.0
    print(f"Starting from OpenAI's weights: {name}")
    return model, True


model, PRETRAINED = starting_model()
CTX = model.config.context_length
print(model.config)
print(f"{model.num_parameters():,} parameters")

# %% [markdown]
# ## 5. Masked targets carry no gradient
#
# The gradient of the loss with respect to the logits is (softmax - one-hot) / N at every
# counted position, and exactly zero where the target is -100: nothing the model outputs
# there, after the answer's end, is trained. Checked on four examples, through the model.

# %%
model.train()
inputs, targets = dataset.batch(np.arange(4))
inputs, targets = inputs[:, :CTX], targets[:, :CTX]
logits = model(inputs).retain_grad()                  # (4, T, 50257); keep its .grad
loss = F.cross_entropy(logits, targets)
loss.backward()
g = mg.to_numpy(logits.grad)                          # (4, T, 50257)
ignored = targets == -100
print(f"loss {loss.item():.3f} (ln 50257 = {math.log(50257):.3f}); largest |gradient| at the "
      f"{ignored.sum()} ignored positions: {np.abs(g[ignored]).max():.1e}, elsewhere "
      f"{np.abs(g[~ignored]).max():.1e}")
assert (g[ignored] == 0).all() and (np.abs(g[~ignored]).max(axis=-1) > 0).all()
assert np.allclose(g[~ignored].sum(axis=-1), 0, atol=1e-6)   # (softmax - one-hot) / N sums to 0
del logits, loss, g
model.zero_grad()

# %% [markdown]
# ## 6. Fine-tuning
#
# The book: AdamW lr 5e-5, weight decay 0.1, batch 8, 2 epochs, a loss printed every 5 steps
# over 5 batches, and every weight trained. The plain next-token loss of chapter 05 is
# `train()`'s default, and -100 targets are ignored by it, so the loader is all that changes.
# Before training, the model cannot answer: see what it writes after the first validation
# prompt. (The random model gets lr 1e-3 and, in the full mode, one epoch: a few minutes on a CPU.
# On this project's 2-core machine, shared with other jobs, NumPy, seed 123: 116 steps in 287 s,
# training loss 10.26 -> 2.51, validation 10.28 -> 2.67.)

# %%
if QUICK:
    TRAIN, BATCH, EPOCHS, MAX_STEPS, EVAL_EVERY, EVAL_ITER, N_NEW = train_data[:64], 4, 1, 8, 4, 2, 12
elif PRETRAINED:
    TRAIN, BATCH, EPOCHS, MAX_STEPS, EVAL_EVERY, EVAL_ITER, N_NEW = train_data, 8, 2, None, 5, 5, 256
else:
    TRAIN, BATCH, EPOCHS, MAX_STEPS, EVAL_EVERY, EVAL_ITER, N_NEW = train_data, 8, 1, None, 10, 5, 64
LR = 5e-5 if PRETRAINED else 1e-3
train_set = InstructionDataset(TRAIN, tokenizer, max_length=CTX)
val_set = InstructionDataset(val_data, tokenizer, max_length=CTX)
train_loader = instruction_loader(train_set, BATCH, shuffle=True, drop_last=True, seed=123)
val_loader = instruction_loader(val_set, BATCH)
print(f"{len(train_loader)} training batches of {BATCH} per epoch, {len(val_loader)} validation batches")


def respond(entry, max_new_tokens=N_NEW):
    """The model's answer to an entry: greedy, ending at <|endoftext|>, as the book extracts it."""
    prompt = tokenizer.encode(format_input(entry))
    out = generate(model, np.array([prompt]), max_new_tokens, eos_id=tokenizer.eot_id)[0]
    return tokenizer.decode(out[len(prompt):]).replace("### Response:", "").strip()


print("before fine-tuning:", repr(respond(val_data[0], 20)))
optimizer = make_optimizer(model, lr=LR, weight_decay=0.1)
state = TrainState()
t0 = time.perf_counter()
history = train(model, train_loader, val_loader, optimizer,
                TrainConfig(epochs=EPOCHS, max_steps=MAX_STEPS, eval_every=EVAL_EVERY, eval_iter=EVAL_ITER,
                            eval_final=True, sample_prompt=None), state=state)
seconds = time.perf_counter() - t0
print(f"{state.step} steps, {state.tokens_seen:,} tokens in {seconds:.0f} s, evaluations included "
      f"({state.tokens_seen / seconds:,.0f} tokens/s); loss: train {history.train_losses[0]:.3f} -> "
      f"{history.train_losses[-1]:.3f}, val {history.val_losses[0]:.3f} -> {history.val_losses[-1]:.3f}")
assert history.train_losses[-1] < history.train_losses[0] and history.val_losses[-1] < history.val_losses[0]
plot = plot_losses(history, OUT / "loss.png", title="instruction fine-tuning: loss")
print("saved", plot)

# %% [markdown]
# ## 7. Answers to test instructions
#
# Generation as the book's chapter 7 does it: greedy, token by token, and stop as soon as the
# model writes <|endoftext|> (not appending it). Inline first, for a few tokens, then the
# library's `generate(..., eos_id=50256)` (which also uses the KV cache) gives the same tokens.

# %%
def generate_by_hand(model, ids, max_new_tokens, eos_id):
    model.eval()
    for _ in range(max_new_tokens):
        with mg.no_grad():
            logits = model(ids[:, -CTX:]).numpy()[:, -1, :]     # (1, V): the last position
        next_id = logits.argmax(axis=-1, keepdims=True)        # greedy
        if next_id[0, 0] == eos_id:
            break
        ids = np.concatenate([ids, next_id], axis=1)
    return ids


prompt = np.array([tokenizer.encode(format_input(test_data[0]))])
by_hand = generate_by_hand(model, prompt, 10, tokenizer.eot_id)
assert np.array_equal(by_hand, generate(model, prompt, 10, eos_id=tokenizer.eot_id))
print(f"{by_hand.shape[1] - prompt.shape[1]} new tokens, the same from generate()")

for entry in test_data[:3]:
    print("-" * 40)
    print(format_input(entry))
    print(f"\nCorrect response:\n>> {entry['output']}")
    print(f"\nModel response:\n>> {respond(entry)}")
print("-" * 40)

# %% [markdown]
# The book scores every test answer with a larger model (Llama 3 via ollama) and reports the
# mean score; that needs a model this project does not have, so it is left out here.
#
# ## 8. A checkpoint that chat prompts the right way
#
# A model fine-tuned on the Alpaca layout answers best when prompted in it. The checkpoint's
# tokenizer.json records the template (`"prompt_template": "alpaca"`), and `python -m gpt2 chat`
# reads it and lays every turn out that way.

# %%
class AlpacaRecord:
    """GPT-2's tokenizer record, plus the prompt template this model was fine-tuned with."""
    vocab_size = tokenizer.vocab_size

    def to_dict(self):
        return {**tokenizer.to_dict(), "prompt_template": "alpaca"}


ckpt = save_checkpoint(OUT / "checkpoint", model, tokenizer=AlpacaRecord())
assert template_of_checkpoint(ckpt) == ALPACA
reloaded = load_model(ckpt)
assert all(np.array_equal(mg.to_numpy(a), mg.to_numpy(b))
           for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
print(f"saved {ckpt}; talk to it with:\n  python -m gpt2 chat --checkpoint {ckpt}")
print("(chapter 12 starts preference tuning from this checkpoint when it is there)")

# %% [markdown]
# The whole fine-tuning from the command line (the book's settings):
#
#     python -m gpt2 finetune instruct
