"""Data-parallel speed: tokens/s of a training step on N ranks, with the all-reduce timed alone.

    OMP_NUM_THREADS=2 python benchmarks/data_parallel.py --batch-size 2                  # 1 rank x 2 threads
    OMP_NUM_THREADS=1 mpiexec -n 2 python benchmarks/data_parallel.py --batch-size 1     # 2 ranks x 1 thread
    OMP_NUM_THREADS=1 mpiexec -n 2 python benchmarks/data_parallel.py --batch-size 1 --zero 1
    mpiexec -n 2 python benchmarks/data_parallel.py --allreduce-only        # the collective alone

The model is the course run's (GPT-2 124M shape, context 256, untied head, dropout 0.1) unless
overridden; the tokens are random (speed does not depend on them). Each step is the training
loop's: forward + backward on this rank's batch, then (timed separately) a barrier, so that the
all-reduce that follows is timed alone rather than with the wait for a slower rank, then the
gradient all-reduce (or ZeRO-1's reduce-scatter), then AdamW (with ZeRO-1: the shard update and
the all-gather). After --warmup untimed steps, the medians of --steps steps are printed by rank
0, with the optimizer state held per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minigrad as mg  # noqa: E402
from gpt2 import GPTModel, course_config  # noqa: E402
from gpt2.evaluate import calc_loss_batch
from gpt2.train import make_optimizer  # noqa: E402
from minigrad import distributed  # noqa: E402
from minigrad.zero import ZeroAdamW  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=1, help="windows per rank per step")
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--emb-dim", type=int, default=None)
    p.add_argument("--n-heads", type=int, default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--zero", type=int, choices=[0, 1], default=0)
    p.add_argument("--json", action="store_true", help="one JSON line instead of text")
    p.add_argument("--allreduce-only", action="store_true",
                   help="time only all-reduces of a float32 buffer as large as the model's parameters")
    args = p.parse_args()

    mg.backend.tune_malloc()  # as `python -m gpt2 train` runs: freed memory kept for reuse
    comm = distributed.init()
    if args.allreduce_only:
        allreduce_only(comm, args)
        return
    overrides = {k: v for k, v in (("n_layers", args.n_layers), ("emb_dim", args.emb_dim),
                                   ("n_heads", args.n_heads)) if v is not None}
    config = course_config(context_length=args.context_length, **overrides)
    mg.manual_seed(123)
    model = GPTModel(config)
    optimizer = make_optimizer(model)
    bucket = None
    if args.zero:
        optimizer = ZeroAdamW.from_adamw(optimizer, comm)
    elif comm.world_size > 1:
        bucket = distributed.GradientBucket(model.parameters(), comm)
    data = np.random.default_rng(comm.rank)
    B, T = args.batch_size, config.context_length
    times = {"step": [], "compute": [], "wait": [], "all_reduce": [], "optimizer": []}
    for i in range(args.warmup + args.steps):
        x = data.integers(0, config.vocab_size, size=(B, T))
        y = data.integers(0, config.vocab_size, size=(B, T))
        t0 = time.perf_counter()
        optimizer.zero_grad()
        calc_loss_batch(x, y, model).backward()
        t1 = time.perf_counter()
        comm.barrier()
        t2 = time.perf_counter()
        if args.zero:
            optimizer.reduce_gradients()
        elif bucket is not None:
            bucket.average_()
        t3 = time.perf_counter()
        optimizer.step()
        t4 = time.perf_counter()
        if i >= args.warmup:
            for k, v in (("step", t4 - t0), ("compute", t1 - t0), ("wait", t2 - t1), ("all_reduce", t3 - t2),
                         ("optimizer", t4 - t3)):
                times[k].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    if args.zero:
        state_bytes = optimizer.state_bytes()
    else:
        state_bytes = sum(a.nbytes for st in optimizer.state for a in st.values())
    every_rank_state = comm.all_gather_object(state_bytes)
    result = {"ranks": comm.world_size, "threads_per_rank": os.environ.get("OMP_NUM_THREADS", "unset"),
              "batch_per_rank": B, "context": T, "parameters": model.num_parameters(), "zero": args.zero,
              "steps": args.steps, "median_s": med,
              "tokens_per_s": comm.world_size * B * T / med["step"],
              "optimizer_state_mib_per_rank": [b / 2**20 for b in every_rank_state]}
    if comm.rank:
        return
    if args.json:
        print(json.dumps(result))
        return
    zero, threads = (", ZeRO-1" if args.zero else ""), result["threads_per_rank"]
    print(f"{comm.world_size} rank(s) x {threads} thread(s), batch {B} per rank, context {T}, "
          f"{result['parameters']:,} parameters{zero}; medians of {args.steps} steps:")
    print(f"  step {med['step']:.3f} s = forward+backward {med['compute']:.3f} + waiting for the slowest "
          f"rank {med['wait']:.3f} + gradient {'reduce-scatter' if args.zero else 'all-reduce'} "
          f"{med['all_reduce']:.3f} + optimizer{' (+ all-gather)' if args.zero else ''} "
          f"{med['optimizer']:.3f}")
    print(f"  {result['tokens_per_s']:,.0f} tokens/s; optimizer state per rank "
          + ", ".join(f"{m:,.1f} MiB" for m in result["optimizer_state_mib_per_rank"]))


def allreduce_only(comm, args) -> None:
    """The gradient all-reduce alone: `comm.all_reduce_` (non-blocking, polled against the
    deadline) and, for comparison, MPI's blocking Allreduce on the same buffer."""
    overrides = {k: v for k, v in (("n_layers", args.n_layers), ("emb_dim", args.emb_dim),
                                   ("n_heads", args.n_heads)) if v is not None}
    config = course_config(context_length=args.context_length, **overrides)
    with mg.backend.no_init():
        n = GPTModel(config).num_parameters()
    buf = np.ones(n, dtype=np.float32)
    times = {"polled": [], "blocking": []}
    for i in range(args.warmup + args.steps):
        for mode in times:
            comm.barrier()
            t0 = time.perf_counter()
            if mode == "polled" or comm.world_size == 1:
                comm.all_reduce_(buf, average=False)
            else:
                from mpi4py import MPI  # noqa: PLC0415

                comm.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            if i >= args.warmup:
                times[mode].append(time.perf_counter() - t0)
    if comm.rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"all-reduce of {n:,} float32 ({4 * n / 2**20:,.0f} MiB) on {comm.world_size} rank(s), "
              f"medians of {args.steps}: {med['polled']:.3f} s polled against the deadline, "
              f"{med['blocking']:.3f} s blocking ({4 * n / med['polled'] / 1e9:.2f} GB/s of buffer)")


if __name__ == "__main__":
    main()
