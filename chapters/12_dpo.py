# %% [markdown]
# # Chapter 12: Preference tuning with DPO
#
# The book's bonus notebook to chapter 7. Instruction fine-tuning (chapter 10) teaches a model
# to answer by imitating good answers. Preference tuning teaches it which of two answers people
# prefer: for each prompt x there is a *chosen* response y_w and a *rejected* one y_l. Direct
# Preference Optimization (Rafailov et al., 2023) does it with one loss and no reward model. A
# frozen copy of the model, the *reference* pi_ref, anchors the policy pi being trained:
#
#     loss = -mean log sigmoid(beta * ((log pi(y_w|x) - log pi_ref(y_w|x))
#                                     - (log pi(y_l|x) - log pi_ref(y_l|x))))
#
# Each bracket is an "implicit reward": how much more likely the policy makes that response
# than the reference does. The loss falls as the chosen reward rises above the rejected one;
# beta (0.1 in the book) sets how far the policy may drift from the reference for that gain.
#
# In this chapter:
#
# 1. the preference data: the book's 1,100 instructions, each with a chosen and a rejected answer;
# 2. the tokens that count: the response's, not the prompt's or the padding (inline vs library);
# 3. the starting model: the policy, and a frozen copy of it as the reference;
# 4. a sequence's log-probability: the mean over its response tokens, by hand and from the library;
# 5. the DPO loss by hand and from `gpt2.finetune.dpo_loss`; at the start it is log 2;
# 6. a few DPO steps: the loss falls and the reward margin rises.
#
# **Which model.** The book starts from its chapter 7 model (GPT-2 355M fine-tuned on the
# instructions). Here, in this order: chapter 10's checkpoint if you ran chapter 10
# (runs/chapter10/checkpoint), else OpenAI's weights if they are here (`GPT2_PRETRAINED_DIR`,
# or 124M in the cache where chapter 06 downloads it), else a small GPT of our own with random
# weights. DPO's loss and margin behave the same way from any of them; what the answers read
# like after it depends entirely on where it started.
#
# `GPT2_CHAPTER_QUICK=1 python chapters/12_dpo.py` runs a tiny model for a few steps (the tests do
# this); `MINIGRAD_BACKEND=cupy` runs on a GPU.

# %%
import math
import os
import time
from pathlib import Path

import numpy as np

import minigrad as mg
from gpt2 import GPT2Error, GPTConfig, GPTModel
from gpt2.checkpoint import load_model
from gpt2.finetune import (
    PreferenceDataset,
    dpo_batch_loss,
    dpo_loss,
    format_input,
    load_preference_data,
    preference_loader,
    response_logprobs,
    split_instruction_data,
)
from gpt2.model import build_uninitialised
from gpt2.pretrained import load_pretrained
from gpt2.tokenizer import get_tokenizer
from minigrad import Tensor, nn, no_grad
from minigrad.optim import AdamW

QUICK = os.environ.get("GPT2_CHAPTER_QUICK", "") not in ("", "0")
mg.backend.tune_malloc()   # as `python -m gpt2` does: freed memory reused step after step
CH10_CHECKPOINT = Path(os.environ.get("GPT2_CHAPTER_OUT", "runs/chapter10")) / "checkpoint"
print(f"mode: {'quick' if QUICK else 'full'}, backend {mg.get_backend()}")

# %% [markdown]
# ## 1. The preference data
#
# The instructions of chapter 10, each with two answers (`load_preference_data` downloads the
# book's file once and checks its SHA-256). The book made them with a larger model: one answer
# polite, the other rude, so the preference is about tone, not about facts. Split as chapter
# 10's: 935 / 55 / 110.

# %%
data = load_preference_data()
train_data, val_data, test_data = split_instruction_data(data)
print(f"{len(data):,} entries: train {len(train_data)}, validation {len(val_data)}, test {len(test_data)}")
entry = data[50]
print(format_input(entry))
print(f"\nchosen:   {entry['chosen']}\nrejected: {entry['rejected']}")
assert (len(train_data), len(val_data), len(test_data)) == (935, 55, 110)

# %% [markdown]
# ## 2. The tokens that count
#
# Each answer becomes prompt + "\n\n### Response:\n" + answer, tokenized. DPO compares how
# likely the model finds the *answer*, so a mask marks the tokens to score: not the prompt, not
# the padding. The book's collate function masks the prompt's tokens and the 2 tokens after it,
# the two newlines before "### Response:" (GPT-2 encodes this "\n\n", followed by text, as two
# "\n" tokens; printed below). The header "### Response:\n" is scored, in the chosen and the
# rejected answer alike.
#
# Chosen and rejected batches are padded with 50256 to one shared width (longest + 1).

# %%
tokenizer = get_tokenizer()
PAD = tokenizer.eot_id
pair = data[50:52]
prompts = [tokenizer.encode(format_input(e)) for e in pair]
chosen = [tokenizer.encode(format_input(e) + f"\n\n### Response:\n{e['chosen']}") for e in pair]
rejected = [tokenizer.encode(format_input(e) + f"\n\n### Response:\n{e['rejected']}") for e in pair]
width = max(len(s) + 1 for s in chosen + rejected)


def pad_and_mask(sequences):
    ids = np.full((len(sequences), width), PAD, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=bool)
    for i, (seq, prompt) in enumerate(zip(sequences, prompts)):
        ids[i, :len(seq)] = seq
        mask[i, len(prompt) + 2:len(seq)] = True      # after the prompt (+2), before the padding
    return ids, mask


chosen_ids, chosen_mask = pad_and_mask(chosen)
rejected_ids, rejected_mask = pad_and_mask(rejected)
n_prompt = len(prompts[0])
print(f"width {width}; prompt {n_prompt} tokens; masked after it: "
      f"{[tokenizer.decode([t]) for t in chosen[0][n_prompt:n_prompt + 2]]}; first scored: "
      f"{[tokenizer.decode([t]) for t in chosen_ids[0][chosen_mask[0]][:6]]}")
lib_chosen, lib_rejected = PreferenceDataset(pair, tokenizer).batch(np.arange(2))
assert np.array_equal(lib_chosen.ids, chosen_ids) and np.array_equal(lib_chosen.mask, chosen_mask)
assert np.array_equal(lib_rejected.ids, rejected_ids) and np.array_equal(lib_rejected.mask, rejected_mask)
print(f"scored tokens: chosen {chosen_mask.sum(1).tolist()}, rejected {rejected_mask.sum(1).tolist()}")

# %% [markdown]
# ## 3. The starting model, and the policy and the reference
#
# The policy is the model being trained; the reference is a frozen copy of it as it was before
# DPO, in eval mode. DPO needs log-probabilities from both: four forward passes per batch.

# %%
def small_model():
    small = dict(emb_dim=32, n_heads=2, n_layers=2, context_length=128) if QUICK else \
        dict(emb_dim=128, n_heads=4, n_layers=4, context_length=256)
    mg.manual_seed(123)
    return GPTModel(GPTConfig(vocab_size=50257, dropout=0.0, qkv_bias=True, tie_embeddings=True, **small))


def starting_model():
    """Chapter 10's checkpoint, else OpenAI's GPT-2 (GPT2_PRETRAINED_DIR, or 124M from the
    cache), else a small random GPT."""
    if CH10_CHECKPOINT.is_dir():
        print(f"Starting from chapter 10's instruction-tuned model: {CH10_CHECKPOINT}")
        return load_model(CH10_CHECKPOINT), "chapter 10"
    name = os.environ.get("GPT2_PRETRAINED_DIR") or "gpt2"
    os.environ.setdefault("GPT2_OFFLINE", "1")   # no 548 MB download from here: chapter 06 does it
    try:
        model = load_pretrained(name)
    except GPT2Error as exc:
        print(f"No chapter 10 checkpoint at {CH10_CHECKPOINT}, and OpenAI's weights are not here "
              f"({str(exc).split('. ')[0]}).\nStarting from a small GPT of OUR OWN with RANDOM "
              "weights instead: its answers mean nothing, but DPO's loss and margins behave as they do "
              "from any start.")
        return small_model(), "random"
    for m in model.modules():   # the book tunes with drop_rate 0.0
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_p"):
            m.dropout_p = 0.0
    print(f"Starting from OpenAI's weights: {name}")
    return model, "OpenAI"


policy, START = starting_model()
reference = build_uninitialised(policy.config)   # a copy: the same weights, frozen, in eval mode
reference.load_state_dict(policy.state_dict())
reference.requires_grad_(False)
reference.eval()
CTX = policy.config.context_length
print(policy.config)
print(f"{policy.num_parameters():,} parameters (and as many in the frozen reference)")

# %% [markdown]
# ## 4. A response's log-probability
#
# log pi(y|x) is a sum over the response's tokens of log softmax(logits)[token]. Position t
# predicts token t + 1, so the targets are the ids shifted left by one, and so is the mask. The
# book's notebook takes the *mean* over the scored tokens rather than the paper's sum, which
# keeps long and short answers on one scale. By hand, in float64, then the library's
# `response_logprobs` (whose gather is fused with the log-softmax).

# %%
with no_grad():
    logits = policy.eval()(chosen_ids[:, :CTX])                     # (2, T, 50257)
z = logits.numpy().astype(np.float64)
log_probs = z - z.max(-1, keepdims=True)
log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))       # log softmax
ids, mask = chosen_ids[:, :CTX], chosen_mask[:, :CTX]
per_token = np.take_along_axis(log_probs[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]   # (2, T-1)
scored = mask[:, 1:]                                                # the shifted mask
by_hand = (per_token * scored).sum(1) / scored.sum(1)
lib = response_logprobs(logits, ids, mask).numpy().astype(np.float64)
print(f"log pi(chosen|x), mean per token: by hand {by_hand.round(4).tolist()}, "
      f"library {lib.round(4).tolist()} (uniform over the vocabulary: {-math.log(50257):.4f})")
assert np.allclose(by_hand, lib, rtol=1e-4)

# %% [markdown]
# ## 5. The DPO loss
#
# With z = beta * (chosen reward - rejected reward) for each pair, the loss is the mean of
# -log sigmoid(z) = log(1 + e^-z). By hand on made-up log-probabilities first, then the
# library's `dpo_loss`, which also reports the mean rewards and their margin (without the
# factor beta, as the book prints them).

# %%
rng = np.random.default_rng(0)
pc, pr, rc, rr = (rng.normal(-2.0, 0.5, size=4) for _ in range(4))   # (4,) each: policy / reference
beta = 0.1
z_pairs = beta * ((pc - rc) - (pr - rr))
loss_by_hand = np.log1p(np.exp(-z_pairs)).mean()
out = dpo_loss(Tensor(pc), Tensor(pr), rc, rr, beta=beta)
print(f"loss by hand {loss_by_hand:.6f}, dpo_loss {out.loss.item():.6f}; "
      f"margin {out.reward_margin:.4f} = {np.mean(pc - rc):.4f} - {np.mean(pr - rr):.4f}")
assert np.isclose(loss_by_hand, out.loss.item(), rtol=1e-5)
assert np.isclose(out.reward_margin, np.mean((pc - rc) - (pr - rr)), rtol=1e-5)

# %% [markdown]
# At the start the policy *is* the reference: both rewards are 0, z = 0, and the loss is
# -log sigmoid(0) = log 2 = 0.6931 for every batch, whatever the data. On the two examples
# above, through both models:

# %%
chosen_batch, rejected_batch = PreferenceDataset(pair, tokenizer, max_length=CTX).batch(np.arange(2))
with no_grad():
    start = dpo_batch_loss(policy, reference, chosen_batch, rejected_batch, beta=beta)
print(f"DPO loss at the start {start.loss.item():.6f} (log 2 = {math.log(2):.6f}), "
      f"margin {start.reward_margin}")
assert abs(start.loss.item() - math.log(2)) < 1e-6 and start.reward_margin == 0.0

# %% [markdown]
# ## 6. A few DPO steps
#
# The book: AdamW lr 5e-6, weight decay 0.01, beta 0.1, batch 8, one epoch over the 935 pairs.
# Here the first few batches of that epoch only, each loss printed as it is computed (before
# that batch's update, so step 0 is log 2). The book's learning rate is for GPT-2's sizes; our
# small models (width below 768) take 1e-3 in the full mode and 1e-2 in the tiny quick one.
# Before and after, the same pairs measure what changed: the first two training batches (the
# pairs of steps 0 and 1) and pairs from the validation set, which DPO never trains on.
#
# The loop is written out here (the book's `train_model_dpo_simple`, shortened): a DPO batch is
# a pair of batches, and each step runs the policy and the reference on both. The library's
# `gpt2.finetune.DPOTask` (what `python -m gpt2 finetune dpo` runs) computes the same loss on
# `train()`, the pretraining loop: it stacks each batch's chosen and rejected sequences into one
# (2B, T) array, so that each model runs once per batch.

# %%
BATCH, STEPS = (2, 4) if QUICK else (8, 20)
LR = 5e-6 if policy.config.emb_dim >= 768 else (1e-2 if QUICK else 1e-3)
train_loader = preference_loader(PreferenceDataset(train_data, tokenizer, max_length=CTX), BATCH,
                                 shuffle=True, drop_last=True, seed=123)
val_loader = preference_loader(PreferenceDataset(val_data, tokenizer, max_length=CTX), BATCH)
trained_pairs = list(zip(range(2), train_loader.batches()))          # steps 0 and 1's batches
held_out = list(zip(range(1 if QUICK else 2), val_loader.batches()))


def evaluate_dpo(batches):
    """Mean loss, chosen reward, rejected reward and margin over (index, (chosen, rejected))."""
    policy.eval()
    with no_grad():
        outs = [dpo_batch_loss(policy, reference, c, r, beta=beta) for _, (c, r) in batches]
    policy.train()
    rows = [[o.loss.item(), o.chosen_reward, o.rejected_reward, o.reward_margin] for o in outs]
    return np.mean(rows, axis=0)


before = {"trained": evaluate_dpo(trained_pairs), "validation": evaluate_dpo(held_out)}
optimizer = AdamW(policy.trainable_parameters(), lr=LR, weight_decay=0.01)
policy.train()
print(f"lr {LR}, beta {beta}, batch {BATCH}")
print(f"{'step':>4}  {'loss':>7}  {'chosen':>8}  {'rejected':>8}  {'margin':>8}   (rewards: mean log-ratios)")
t0 = time.perf_counter()
losses = []
for step, (c, r) in zip(range(STEPS), train_loader):
    optimizer.zero_grad()
    out = dpo_batch_loss(policy, reference, c, r, beta=beta)
    out.loss.backward()
    optimizer.step()
    losses.append(out.loss.item())
    print(f"{step:4d}  {losses[-1]:7.4f}  {out.chosen_reward:8.4f}  {out.rejected_reward:8.4f}  "
          f"{out.reward_margin:8.4f}")
print(f"{STEPS} steps of {BATCH} pairs in {time.perf_counter() - t0:.0f} s")
after = {"trained": evaluate_dpo(trained_pairs), "validation": evaluate_dpo(held_out)}
for name in before:
    for label, v in (("before", before[name]), ("after", after[name])):
        print(f"{name:10} pairs {label:6}: loss {v[0]:.4f}, chosen {v[1]:8.4f}, rejected {v[2]:8.4f}, "
              f"margin {v[3]:.4f}")
assert abs(losses[0] - math.log(2)) < 1e-5                    # step 0 is computed at the reference
assert after["trained"][0] < before["trained"][0] and after["trained"][3] > before["trained"][3]

# %% [markdown]
# The margin is what DPO optimises; the two rewards may both rise or both fall. In the full
# mode on this project's 2-core machine (NumPy, seed 123, 20 steps at lr 1e-3) both rose from
# random weights (validation: chosen +0.48, rejected +0.37, margin 0.11), and both fell from
# chapter 10's full-mode model (validation: chosen -2.39, rejected -2.55, margin 0.15): the
# policy moved away from the reference on both answers and a little less on the chosen one.
# That drift is why the book keeps the learning rate small and beta at 0.1: the further the
# policy moves from the reference, the more it may lose of what it could do before.

# %% [markdown]
# The whole run from the command line (the book's settings):
#
#     python -m gpt2 finetune dpo
