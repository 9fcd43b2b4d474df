"""minigrad.parallel: long elementwise work split over threads gives the same numbers as one thread.

No timing is asserted (speed is measured by `python -m gpt2 bench`); these check the splitting
itself, that errors come back, and that the thread count follows the environment.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from minigrad import kernels, parallel


@pytest.fixture
def threads():
    """Set the thread count for one test; restored afterwards."""
    before = parallel.num_threads()
    yield parallel.set_num_threads
    parallel.set_num_threads(before)


@pytest.mark.parametrize("n, min_items, align", [(10, 1, 1), (1000, 100, 64), (7, 1, 4), (0, 1, 1)])
def test_pieces_cover_the_range_once_on_aligned_boundaries(threads, n, min_items, align):
    threads(3)
    parts = parallel.pieces(n, min_items, align)
    assert len(parts) <= 3
    covered = [i for a, b in parts for i in range(a, b)]
    assert covered == list(range(n))
    assert all(a % align == 0 for a, _ in parts)


def test_short_work_stays_whole_and_one_thread_never_splits(threads):
    threads(4)
    assert parallel.pieces(100, min_items=60) == [(0, 100)]       # two pieces would be under 60
    assert len(parallel.pieces(100, min_items=25)) == 4
    threads(1)
    assert parallel.pieces(10**6, min_items=1) == [(0, 10**6)]


def test_run_uses_other_threads_and_waits_for_all(threads):
    threads(2)
    seen = {}

    def work(part):
        seen[part] = threading.current_thread().name

    parallel.run(work, [(0, 1), (1, 2)])
    assert set(seen) == {(0, 1), (1, 2)}
    assert seen[(0, 1)] == threading.current_thread().name
    assert seen[(1, 2)].startswith("minigrad")
    # inside a pool thread nothing splits again (no waiting on the pool from the pool)
    nested = []
    parallel.run(lambda part: nested.append(parallel.pieces(1000, 1)), [(0, 1), (1, 2)])
    assert [(0, 1000)] in nested


def test_an_error_in_any_piece_is_raised_after_all_pieces_finish(threads):
    threads(2)
    done = []

    def work(part):
        if part == 1:
            raise ZeroDivisionError("piece 1")
        done.append(part)

    with pytest.raises(ZeroDivisionError, match="piece 1"):
        parallel.run(work, [0, 1])
    assert done == [0]
    with pytest.raises(ZeroDivisionError):
        parallel.run(work, [1, 0])
    assert done == [0, 0]


def test_thread_count_from_the_environment(monkeypatch, threads):
    for name in parallel._ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert parallel._threads_from_environment() == 1
    monkeypatch.setenv("MINIGRAD_NUM_THREADS", "3")                # minigrad's own comes first
    assert parallel._threads_from_environment() == 3
    monkeypatch.setenv("MINIGRAD_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="MINIGRAD_NUM_THREADS='two' is not a whole number"):
        parallel._threads_from_environment()
    monkeypatch.setenv("MINIGRAD_NUM_THREADS", "0")
    with pytest.raises(ValueError, match="at least 1"):
        parallel._threads_from_environment()
    with pytest.raises(ValueError, match="integer >= 1"):
        threads(0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_split_over_threads_is_bit_identical(monkeypatch, threads, dtype):
    # small chunk and split sizes, so a small array is cut into chunks and pieces
    monkeypatch.setattr(kernels, "ADAMW_CHUNK", 128)
    monkeypatch.setattr(kernels, "ADAMW_PARALLEL_MIN", 256)
    rng = np.random.default_rng(0)
    w, g, m = (rng.standard_normal((33, 61)).astype(dtype) for _ in range(3))
    v = np.abs(rng.standard_normal((33, 61))).astype(dtype)
    results = []
    for n in (1, 2, 3):
        threads(n)
        ww, mm, vv = w.copy(), m.copy(), v.copy()
        for step in (1, 2):
            kernels.adamw_update_(ww, g, mm, vv, 1e-2, 0.9, 0.95, 1e-8, 0.1, step)
        results.append((ww, mm, vv))
    assert len(parallel.pieces(w.size, 256, align=128)) == 3
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(results[0][0], w)                 # it did update
