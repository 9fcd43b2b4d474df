"""Spreading a long elementwise update over the CPU's cores, with plain Python threads.

NumPy runs every operation on one core. Its matmuls go to a multithreaded BLAS, but AdamW's
update, a dozen elementwise passes over every weight, runs on one core while the others wait.
NumPy's loops release the GIL while they run, so Python threads *can* run them side by side:
cut a parameter into one contiguous piece per core, give each piece to a thread, and the same
formula runs on every core at once.

Splitting changes nothing about the numbers: every element goes through the same operations
in the same order whichever piece it lands in, so the results are bit-identical to one thread's.

It only pays for long runs of work. Each NumPy call hands the GIL back and forth between the
threads, which costs microseconds: a weight matrix's AdamW update gains, while an activation's
GELU of a few hundred microseconds does not (benchmarks/README.md). So callers give a minimum
piece size, and `pieces` returns a single piece below it. A pool thread never splits again (no
nested waiting).

The thread count is, in order: `set_num_threads(n)`, the environment variable
MINIGRAD_NUM_THREADS, OMP_NUM_THREADS or OPENBLAS_NUM_THREADS (so a launcher that pins BLAS to
one thread per process, as for data-parallel ranks, pins this too), else the cores this process
may run on. One thread means no pool at all. On a GPU (CuPy) none of this is used: a fused
kernel is already parallel.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_ENV_VARS = ("MINIGRAD_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")

_num_threads: int | None = None       # None: read from the environment on first use
_pool: ThreadPoolExecutor | None = None
_local = threading.local()            # .worker is True inside a pool thread


def _threads_from_environment() -> int:
    for name in _ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a whole number of threads; "
                                 f"set it to 1 or more, or unset it") from None
            if n < 1:
                raise ValueError(f"{name}={n}: the thread count must be at least 1")
            return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def num_threads() -> int:
    """How many threads long elementwise work is split over (1: not split)."""
    global _num_threads
    if _num_threads is None:
        _num_threads = _threads_from_environment()
    return _num_threads


def set_num_threads(n: int) -> None:
    """Use n threads from now on (1 turns splitting off)."""
    global _num_threads, _pool
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the thread count must be an integer >= 1, got {n!r}")
    if _pool is not None and n != _num_threads:
        _pool.shutdown(wait=True)
        _pool = None
    _num_threads = n


def _forget_pool_in_child() -> None:
    # a forked child inherits the pool object but not its threads
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _mark_worker() -> None:
    _local.worker = True


def _in_worker() -> bool:
    return getattr(_local, "worker", False)


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=num_threads() - 1, thread_name_prefix="minigrad",
                                   initializer=_mark_worker)
    return _pool


def pieces(n: int, min_items: int, align: int = 1) -> list[tuple[int, int]]:
    """Cut range(n) into contiguous (start, stop) pieces, at most one per thread and each of at
    least `min_items` items (so short work stays whole), boundaries on multiples of `align`."""
    blocks = -(-n // align)
    k = 1 if _in_worker() else max(1, min(num_threads(), n // max(1, min_items), blocks))
    bounds = [min(n, (blocks * i // k) * align) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k) if bounds[i] < bounds[i + 1]]


def run(fn, parts) -> None:
    """Call fn(part) for every part: the first on this thread, the others on the pool at the same
    time; return when all are done, re-raising the first error."""
    parts = list(parts)
    if len(parts) <= 1 or _in_worker():
        for part in parts:
            fn(part)
        return
    futures = [_get_pool().submit(fn, part) for part in parts[1:]]
    try:
        fn(parts[0])
    finally:
        errors = [f.exception() for f in futures]   # wait for every worker before leaving
    for error in errors:
        if error is not None:
            raise error
