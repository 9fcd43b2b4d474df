# %% [markdown]
# # Chapter 8: Data-parallel training
#
# One process trains on one batch at a time. To train on more data per second, run N copies of
# the training program ("ranks"), one per GPU or per group of CPU cores, give each a different
# slice of the batch, and keep their weights identical by averaging their gradients every step.
# That is data parallelism, the way nanoGPT (PyTorch DDP) and llm.c (MPI + NCCL) train on
# several GPUs. This chapter builds it from first principles:
#
# 1. why averaging the gradients of N shards gives exactly the gradient of one big batch;
# 2. all-reduce, the one collective that data parallelism needs, and why the ring algorithm
#    costs each rank the same bytes however many ranks there are;
# 3. the library's communicator (`minigrad.distributed`), on MPI between processes;
# 4. ZeRO-1: AdamW's moments sharded across the ranks (`minigrad.zero`), so that optimizer
#    memory per rank falls as 1/N.
#
# It runs in one process (`python chapters/08_data_parallel.py`: one rank, every collective a
# copy) and on several (`mpiexec -n 2 python chapters/08_data_parallel.py`, after
# `pip install -e ".[mpi]"`); every rank checks the same assertions, rank 0 prints.

# %%
import numpy as np

import minigrad as mg
from gpt2 import GPTModel
from gpt2.config import GPTConfig
from gpt2.evaluate import calc_loss_batch
from gpt2.train_extras import rank_slice
from minigrad import distributed
from minigrad.optim import AdamW
from minigrad.zero import ZeroAdamW

comm = distributed.init()          # SingleProcess here, MPI under mpiexec
say = print if comm.rank == 0 else (lambda *args, **kwargs: None)
say(f"{comm.world_size} rank(s), communicator: {type(comm).__name__}")

# %% [markdown]
# ## 1. Averaging shard gradients is one big batch
#
# The training loss is the *mean* over the batch of a per-example loss: for a batch of 2B
# examples, L = 1/(2B) Σ_i l_i. Split the batch into two halves of B, with means L_1 and L_2:
#
#     L = 1/(2B) (Σ_{first half} l_i + Σ_{second half} l_i) = (L_1 + L_2) / 2
#
# and since the gradient is linear, ∇L = (∇L_1 + ∇L_2) / 2. The same holds for N equal shards:
# the average of the N shard gradients *is* the full-batch gradient. Two conditions hide in
# that line: the shards must be the same size (else the mean needs weights), and the per-example
# losses must be independent of each other. Dropout draws random masks, so the equality is exact
# only with dropout off (or with every example's mask the same in both set-ups).
#
# Checked small first, on a tiny GPT in float64 (a few hundred thousand parameters), in this
# process alone: the gradient of a batch of 2B = 4 against the mean of the gradients of its two
# halves.

# %%
mg.set_default_dtype(np.float64)
config = GPTConfig(vocab_size=96, context_length=16, emb_dim=32, n_heads=2, n_layers=2, dropout=0.0,
                   qkv_bias=True, tie_embeddings=False)
mg.manual_seed(0)
model = GPTModel(config)
params = model.parameters()
data_rng = np.random.default_rng(0)
BATCH = 2 * max(comm.world_size, 2)   # 4 here; splits evenly over the ranks in section 3
x = data_rng.integers(0, config.vocab_size, size=(BATCH, config.context_length))   # (2B, T) inputs
y = data_rng.integers(0, config.vocab_size, size=(BATCH, config.context_length))   # (2B, T) targets


def gradients(inputs, targets):
    """The loss's gradient for every parameter, as a list of host arrays."""
    for p in params:
        p.grad = None
    calc_loss_batch(inputs, targets, model).backward()
    return [mg.to_numpy(p.grad).copy() for p in params]


half = BATCH // 2
full = gradients(x, y)                       # one batch of 2B
halves = [gradients(x[:half], y[:half]), gradients(x[half:], y[half:])]
averaged = [(a + b) / 2 for a, b in zip(*halves)]
worst = max(float(np.abs(f - a).max()) for f, a in zip(full, averaged))
say(f"{len(params)} parameter arrays; largest difference, full batch vs mean of halves: {worst:.1e}")
assert all(np.allclose(f, a, rtol=1e-12, atol=1e-14) for f, a in zip(full, averaged))

# %% [markdown]
# So N ranks that each compute the gradient of their own B examples, average the N gradients,
# and apply the same AdamW update to the same weights, take exactly the step that one process
# takes with a batch of N × B. Their weights stay identical without ever being sent: only
# gradients move. (`--batch-size` is therefore per rank, as in nanoGPT and llm.c, and the
# global batch is ranks × batch.)
#
# ## 2. All-reduce, and the ring
#
# The averaging is an *all-reduce*: every rank contributes an array, every rank receives the
# element-wise sum. The obvious way, every rank sending its whole gradient to every other rank,
# sends (N - 1) × S bytes per rank for a gradient of S bytes: it grows with N.
#
# The ring algorithm (Baidu's, used by NCCL and most MPIs for large arrays) cuts each array into
# N chunks and passes chunks around a ring, rank r sending to rank r + 1:
#
# * **reduce-scatter** (N - 1 steps): at step s, rank r sends its running sum of chunk (r - s)
#   to its neighbour, which adds its own. After N - 1 steps rank r holds the complete sum of
#   chunk (r + 1) mod N.
# * **all-gather** (N - 1 steps): the completed chunks travel once more around the ring, each
#   rank copying what it receives, until every rank has every summed chunk.
#
# Each step every rank sends one chunk of S / N bytes, so in all 2 (N - 1) / N × S bytes:
# under 2 S for any N. Adding ranks adds steps (latency), not bytes per rank.
#
# Simulated here with N "ranks" as a list of arrays, and checked against the plain sum:

# %%
def ring_all_reduce(arrays):
    """Ring all-reduce over N equal-length 1-D arrays (one per simulated rank), in place.
    Returns the number of items each rank sent."""
    n = len(arrays)
    chunks = [np.array_split(a, n) for a in arrays]   # views: chunks[r][c] is rank r's chunk c
    sent = 0
    for s in range(n - 1):                            # reduce-scatter
        outgoing = [chunks[r][(r - s) % n].copy() for r in range(n)]   # everyone sends at once
        for r in range(n):
            chunks[(r + 1) % n][(r - s) % n] += outgoing[r]
        sent += max(len(o) for o in outgoing)
    for s in range(n - 1):                            # all-gather
        outgoing = [chunks[r][(r + 1 - s) % n].copy() for r in range(n)]
        for r in range(n):
            chunks[(r + 1) % n][(r + 1 - s) % n][...] = outgoing[r]
        sent += max(len(o) for o in outgoing)
    return sent


for n in (2, 3, 4, 8):
    ranks = [np.random.default_rng(r).standard_normal(1200) for r in range(n)]
    expected = np.sum(ranks, axis=0)
    sent = ring_all_reduce(ranks)
    assert all(np.allclose(r, expected) for r in ranks)
    say(f"N={n}: ring sends {sent:5d} items per rank = {sent / 1200:.2f} x the array "
        f"(2(N-1)/N = {2 * (n - 1) / n:.2f}); everyone-to-everyone: {(n - 1) * 1200:5d}")

# %% [markdown]
# For GPT-2 124M (163M parameters with the course's untied head, 650 MB of float32 gradients)
# that is about 1.3 GB sent and received per rank per step whatever N is: over NVLink (~400 GB/s)
# a few milliseconds, over a 10 Gbit/s network a second. That is why one all-reduce per step
# over one flat buffer matters: per-call latency (microseconds on a GPU link, more on a
# network) would be paid once per parameter array otherwise, about 150 times a step.
#
# ## 3. The library's communicator
#
# `minigrad.distributed.init()` returns this process's communicator: `SingleProcess` alone,
# `MPICommunicator` (mpi4py on NumPy arrays) under `mpiexec`, `NCCLCommunicator` (NCCL through
# CuPy, one GPU per rank) with the cupy backend. All collectives take flat buffers. The training
# loop copies every gradient into one flat bucket and makes one call (`GradientBucket`):
#
#     loss.backward()
#     bucket.average_()          # all-reduce of the flat gradients, divided by N
#     optimizer.step()           # the same update on every rank
#
# Here every rank takes its slice of the batch of section 1 (`rank_slice`: rank r of N takes
# rows [r B, (r + 1) B)), computes its gradient, and the bucket averages them; every rank then
# checks the result against the full-batch gradient it computes by itself. In one process the
# slice is the whole batch and the average a no-op.

# %%
xs, ys = rank_slice(x, y, comm=comm)
say(f"rank 0 trains on rows 0..{len(xs) - 1} of the batch of {len(x)}")
assert len(xs) * comm.world_size == len(x)
for p in params:
    p.grad = None
calc_loss_batch(xs, ys, model).backward()
distributed.GradientBucket(params, comm).average_()
assert all(np.allclose(mg.to_numpy(p.grad), f, rtol=1e-12, atol=1e-14) for p, f in zip(params, full))
say(f"after the all-reduce every rank holds the full-batch gradient ({comm.calls} collective call(s))")

# %% [markdown]
# A rank that dies (out of memory, a node lost) would leave the others waiting inside a
# collective forever. So every collective is started non-blocking and polled against a deadline
# (`MINIGRAD_DIST_TIMEOUT`, 300 s by default): past it the waiting rank prints which collective
# it was in and aborts the whole job.
#
# ## 4. ZeRO-1: sharding the optimizer state
#
# Data parallelism as above keeps everything on every rank: the weights, the gradients and
# AdamW's two moments m and v, which alone are twice the size of the weights. And all N ranks
# compute the same AdamW update on the same numbers. ZeRO stage 1 (Rajbhandari et al., 2020; the
# scheme llm.c uses) splits that redundant work and memory instead. Flatten all parameters
# into one vector and cut it into N shards; rank r owns shard r:
#
# 1. **reduce-scatter** the flat gradients: rank r receives only the average of shard r;
# 2. rank r runs AdamW on shard r: its slice of the weights, with its m and v (1/N of them);
# 3. **all-gather** the updated weight shards, so every rank has every weight again.
#
# Reduce-scatter then all-gather are exactly the two halves of the ring all-reduce above, so
# the bytes sent are the same as plain data parallelism, while optimizer memory and work per
# rank fall as 1/N. And because AdamW works element by element, updating slices gives the same
# numbers as updating whole arrays. Small first, in one process: N = 3 simulated ranks
# updating their shards of a flat vector, against AdamW on the whole of it.

# %%
def adamw_elementwise(w, g, m, v, t, lr=0.01, b1=0.9, b2=0.999, eps=1e-8, wd=0.1):
    """The AdamW formula of minigrad.optim, in place on (slices of) flat arrays."""
    w *= 1 - lr * wd
    m[...] = b1 * m + (1 - b1) * g
    v[...] = b2 * v + (1 - b2) * g * g
    w -= lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)


n_sim, size = 3, 10
w_whole = np.random.default_rng(1).standard_normal(size)
w_sharded = w_whole.copy()
m_whole, v_whole = np.zeros(size), np.zeros(size)
bounds = np.linspace(0, size, n_sim + 1).astype(int)              # shard r: [bounds[r], bounds[r+1])
moments = [(np.zeros(b - a), np.zeros(b - a)) for a, b in zip(bounds[:-1], bounds[1:])]
for t in (1, 2, 3):
    g = np.random.default_rng(10 + t).standard_normal(size)      # the (already averaged) gradient
    adamw_elementwise(w_whole, g, m_whole, v_whole, t)
    for r, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):    # each rank: its shard only
        adamw_elementwise(w_sharded[a:b], g[a:b], *moments[r], t)
assert np.array_equal(w_whole, w_sharded)
say(f"{n_sim} shards of AdamW state: sizes {[len(m) for m, _ in moments]}, updates identical to the "
    "whole-array update")

# %% [markdown]
# The library's `ZeroAdamW` does this over the real communicator, with the parameters flattened
# in order (a shard may cut a parameter in two; each piece is updated with its own group's
# learning rate and weight decay). Three steps on the tiny GPT: every rank trains on its slice
# and steps a `ZeroAdamW`, and checks its weights against a plain AdamW that it runs by
# itself on the full batch (the single-process reference). With several ranks the averaged
# float gradients may differ from the full-batch ones in the last bits, hence the tolerance;
# against plain data parallelism ZeRO-1 is bit for bit the same (tests/test_distributed.py).

# %%
mg.manual_seed(0)
reference = GPTModel(config)                      # same seed: the same weights as `model`
ref_opt = AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
zero_opt = ZeroAdamW(model.parameters(), comm, lr=1e-2, weight_decay=0.1)
for _ in range(3):
    ref_opt.zero_grad()
    calc_loss_batch(x, y, reference).backward()  # the whole batch, this process alone
    ref_opt.step()
    zero_opt.zero_grad()
    calc_loss_batch(*rank_slice(x, y, comm=comm), model).backward()
    zero_opt.step()                               # reduce-scatter, shard update, all-gather
for p, q in zip(model.parameters(), reference.parameters()):
    assert np.allclose(mg.to_numpy(p.data), mg.to_numpy(q.data), rtol=1e-10, atol=1e-12)
full_state = 2 * sum(p.size for p in params) * 8     # m and v, float64 here
share = zero_opt.state_bytes() / full_state
say(f"after 3 steps ZeroAdamW on {comm.world_size} rank(s) == AdamW on the full batch; optimizer state "
    f"on this rank: {zero_opt.state_bytes():,} bytes of {full_state:,} ({share:.2f})")
# A checkpoint is the same file as unsharded AdamW's: the moments are gathered back first.
saved = zero_opt.state_dict()                     # a collective: every rank calls it
assert saved["tensors"].keys() == ref_opt.state_dict()["tensors"].keys() and saved["step"] == 3
mg.set_default_dtype(np.float32)

# %% [markdown]
# ## 5. Training from the command line
#
# The training loop of chapter 05 does all of the above when started by mpiexec: each rank
# builds the same model from the same seed, takes its slice of every global batch, averages
# gradients with one all-reduce per step over a flat bucket (or reduce-scatters them with
# `--zero 1`), and only rank 0 prints, draws the progress bar and writes checkpoints:
#
#     pip install -e ".[mpi]"                                       # mpi4py and MPICH's mpiexec
#     mpiexec -n 2 python -m gpt2 train --batch-size 1               # the course run, 2 ranks x 1
#     mpiexec -n 2 python -m gpt2 train --batch-size 1 --zero 1      # ... with ZeRO-1
#     python -m gpt2 train --resume runs/train                       # continue it on one rank
#
# On a CPU machine give each rank its share of the cores (`OMP_NUM_THREADS`), and on GPUs each
# rank takes the GPU of its local rank, with NCCL for the collectives (`--backend cupy`).
# A checkpoint does not depend on the number of ranks: a run saved on N ranks resumes on M
# (exactly when M = N). The README's "Data-parallel training" section has measured speeds.

# %%
say("chapter 08 done")
