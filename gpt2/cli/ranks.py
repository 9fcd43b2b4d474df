"""`train` under `mpiexec -n N`: N ranks run the same command and must agree with each other.

Data parallel training keeps identical weights on every rank by averaging gradients
(minigrad.distributed); what this module adds is what the command itself must agree on:

* the set-up: every rank checks its flags and loads its data, then all compare notes, so an
  error on any rank is printed once (by rank 0) and every rank stops the same way;
* an error during training on some ranks only: that rank says so and stops the whole job
  (the others may be waiting for it in a collective);
* Ctrl-C on any rank: every rank stops after the same step;
* each rank's own dropout generator, and a loader position saved on another number of ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys

import minigrad as mg
from minigrad import distributed

from ..errors import GPT2Error
from .flags import flag_name, one_line


def run_on_every_rank(comm, args, train) -> int:
    """`train(setup)` on this rank, with stdout silenced on ranks other than 0. An error before
    the ranks agreed on their set-up (`setup["agreed"]`) is agreed now, so that every rank raises
    the same one; rank 0 raises it for the CLI to print, the others return exit code 2."""
    setup = {"agreed": False}
    quiet = open(os.devnull, "w") if comm.rank else None  # noqa: SIM115 - closed below
    try:
        with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
            try:
                return train(setup)
            except BaseException as exc:
                if not setup["agreed"]:       # failed before the ranks compared notes: tell them
                    try:
                        agree_setup(comm, setup, args, error=exc)
                    except GPT2Error as agreed:
                        exc = agreed
                if getattr(exc, "every_rank", False):
                    if comm.rank == 0:
                        raise exc from None   # main() prints it once
                    return 2
                # Only this rank knows: say so and stop them all (the others may be waiting in a
                # collective for this one).
                if isinstance(exc, (GPT2Error, mg.BackendError, distributed.DistributedError, OSError)):
                    print(f"error: rank {comm.rank}: {one_line(exc)}", file=sys.stderr, flush=True)
                elif not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    import traceback  # noqa: PLC0415

                    traceback.print_exc()
                comm.abort(130 if isinstance(exc, KeyboardInterrupt) else 2)
                raise
    finally:
        if quiet is not None:
            quiet.close()


def agree_setup(comm, setup: dict, args, error: BaseException | None = None) -> None:
    """Every rank's set-up outcome and flags, compared on every rank (a collective): raises the
    same GPT2Error everywhere if any rank failed or the ranks were given different flags."""
    mine = None
    if error is not None:
        mine = one_line(error) if isinstance(error, (GPT2Error, mg.BackendError)) else \
            f"{type(error).__name__}: {one_line(error)}"
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in ("func", "given")}
    flags = json.loads(json.dumps(flags, default=str))
    digest = hashlib.sha256(json.dumps(flags, sort_keys=True).encode()).hexdigest()
    reports = comm.all_gather_object((mine, digest))
    setup["agreed"] = True
    failed = [(r, m) for r, (m, _) in enumerate(reports) if m is not None]
    problem = None
    if failed:
        if len(failed) == comm.world_size and len({m for _, m in failed}) == 1:
            problem = failed[0][1]
        else:
            problem = "; ".join(f"rank {r}: {m}" for r, m in failed[:3])
    elif len({d for _, d in reports}) > 1:
        every = comm.all_gather_object(flags)
        other = next(r for r, (_, d) in enumerate(reports) if d != reports[0][1])
        diff = [k for k in every[0] if every[0].get(k) != every[other].get(k)]
        shown = ", ".join(f"{flag_name(k)} {every[other].get(k)} (rank 0: {every[0].get(k)})"
                          for k in diff[:3])
        problem = (f"the ranks were started with different flags (rank {other}: {shown}); start every "
                   "rank with the same command")
    if problem is not None:
        err = GPT2Error(problem)
        err.every_rank = True
        raise err


def stop_asked_on_any_rank(comm, stop: dict) -> bool:
    """Whether to stop after this step: `stop["signal"]` (set by a signal handler) on any rank,
    agreed by all (a collective), so that every rank stops after the same step."""
    if comm.world_size == 1:
        return stop["signal"] is not None
    sig = int(comm.all_reduce_scalars([stop["signal"] or 0], op="max")[0])
    stop["signal"] = stop["signal"] or (sig or None)
    # The agreed answer, not this rank's flag: a signal that lands just after the all-reduce would
    # stop this rank alone (the others train on, and wait for it). It counts at the next step.
    return sig != 0


def seed_rank_dropout(comm, seed: int, step: int = 0) -> None:
    """Rank r > 0's own dropout generator, a fresh stream seeded from (seed, step, rank): the same
    weights on every rank, but each its own dropout masks. Rank 0 keeps its generator."""
    if comm.rank:
        mg.manual_seed(seed + 1_000_003 * comm.rank + 7919 * step)


def restore_rank_rng(comm, trainer_state: dict, seed: int, step: int) -> None:
    """Rank r > 0's own dropout generator: as saved when the run had as many ranks, else a
    fresh stream seeded from (seed, step, rank). Rank 0 keeps the checkpoint's generator."""
    if comm.rank == 0:
        return
    saved = trainer_state.get("rank_rng_states")
    if trainer_state.get("world_size") == comm.world_size and isinstance(saved, list) \
            and len(saved) == comm.world_size:
        try:
            mg.set_rng_state(saved[comm.rank])
            return
        except (KeyError, TypeError, ValueError):
            raise GPT2Error("trainer_state.json: rank_rng_states is not a list of random generator states "
                            "(the checkpoint is damaged)") from None
    seed_rank_dropout(comm, seed, step)


def rebatched_loader_state(loader_state: dict, batch_size: int, n_batches: int) -> dict:
    """A loader position saved with another global batch (a run resumed on a different number
    of ranks): the same epoch, at the batch holding the first window not yet trained on (a few
    windows of the current epoch may be seen twice; the order of windows is unchanged)."""
    done = loader_state["batch_index"] * loader_state["batch_size"]
    return {**loader_state, "batch_size": batch_size, "batch_index": min(done // batch_size, n_batches - 1)}
