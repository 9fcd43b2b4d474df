"""Run by tests/test_distributed.py under `mpiexec -n N python tests/distributed_worker.py MODE`.

    collectives   every collective of minigrad.distributed against NumPy computed on one rank,
                  and ZeroAdamW against plain AdamW (bit for bit) with different gradients per rank;
                  on the backend in use: with MINIGRAD_BACKEND=cupy (on a GPU, or on the stand-in
                  through tests/cupy_standin/run.py) the communicator is NCCL's
    hang          the last rank stops (SIGSTOP) before an all-reduce; the others must time out

Prints "rank R ok" per rank on success; any failed assert exits non-zero.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minigrad as mg  # noqa: E402
from minigrad import distributed  # noqa: E402
from minigrad.nn import Parameter  # noqa: E402
from minigrad.optim import AdamW  # noqa: E402
from minigrad.zero import ZeroAdamW  # noqa: E402


def rank_data(rank: int, n: int) -> np.ndarray:
    return np.random.default_rng([7, rank]).standard_normal(n).astype(np.float32)


def dev(a: np.ndarray):
    """A host array on the backend in use."""
    return mg.backend.asarray(a)


def host(a) -> np.ndarray:
    return mg.to_numpy(a)


def check_collectives(comm) -> None:
    r, w = comm.rank, comm.world_size
    every = [rank_data(k, 12 * w) for k in range(w)]
    total = every[0].copy()
    for a in every[1:]:
        total += a

    buf = dev(rank_data(r, 12 * w))
    comm.all_reduce_(buf, average=False)
    assert np.array_equal(host(buf), total), "all-reduce sum"
    buf = dev(rank_data(r, 12 * w))
    comm.all_reduce_(buf)
    np.testing.assert_allclose(host(buf), total / w, rtol=1e-6)

    shard = dev(np.empty(12, dtype=np.float32))
    comm.reduce_scatter(dev(rank_data(r, 12 * w)), shard, average=False)
    assert np.array_equal(host(shard), total[12 * r:12 * (r + 1)]), "reduce-scatter"

    gathered = dev(np.empty(12 * w, dtype=np.float32))
    comm.all_gather_(dev(rank_data(r, 12)), gathered)
    want = np.concatenate([rank_data(k, 12) for k in range(w)])
    assert np.array_equal(host(gathered), want), "all-gather"

    assert comm.all_reduce_scalars([r, 1.0]).tolist() == [sum(range(w)), w]
    assert comm.all_reduce_scalars([r], op="max").tolist() == [w - 1]
    assert comm.any(r == w - 1) and not comm.any(False)
    assert comm.all_gather_object({"rank": r}) == [{"rank": k} for k in range(w)]
    assert comm.broadcast_object("from 0" if r == 0 else None) == "from 0"
    assert comm.world_size == 1 or comm.calls > 0


def check_zero(comm) -> None:
    """ZeroAdamW on N ranks == AdamW on the averaged gradients, bit for bit, including the
    consolidated checkpoint; two groups (one without weight decay); shapes that straddle shards."""
    shapes = [(5, 3), (7,), (4, 4), (1,)]

    def params():
        g = np.random.default_rng(1)
        return [Parameter(dev(g.standard_normal(s).astype(np.float32))) for s in shapes]

    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}]

    ref_params, zero_params = params(), params()
    ref = AdamW(groups(ref_params), lr=0.01, weight_decay=0.1)
    zero = ZeroAdamW.from_adamw(AdamW(groups(zero_params), lr=0.01, weight_decay=0.1), comm)
    w = comm.world_size
    for step in range(3):
        grads = [[np.random.default_rng([step, r, k]).standard_normal(s).astype(np.float32)
                  for k, s in enumerate(shapes)] for r in range(w)]
        for k, p in enumerate(ref_params):
            total = grads[0][k].copy()
            for g in grads[1:]:
                total += g[k]
            p.grad = dev(total / np.float32(w))
        for k, p in enumerate(zero_params):
            p.grad = dev(grads[comm.rank][k])
        ref.step()
        zero.reduce_gradients()
        zero.clip_grad_norm_(1e9)      # a no-op clip, to exercise the global norm
        zero.step()
    for a, b in zip(ref_params, zero_params):
        assert np.array_equal(host(a.data), host(b.data)), "ZeroAdamW weights differ from AdamW's"
    got, want = zero.state_dict(), ref.state_dict()
    assert got["step"] == want["step"] and got["groups"] == want["groups"]
    assert got["tensors"].keys() == want["tensors"].keys()
    for k in want["tensors"]:
        assert np.array_equal(host(got["tensors"][k]), host(want["tensors"][k])), f"moment {k}"
    assert zero.state_bytes() * w >= 2 * 4 * sum(p.size for p in ref_params)
    assert zero.state_bytes() <= 2 * 4 * (-(-sum(p.size for p in ref_params) // w))


def main() -> None:
    mode = sys.argv[1]
    comm = distributed.init()
    expected = "NCCLCommunicator" if mg.get_backend() == "cupy" and comm.world_size > 1 else None
    assert expected is None or type(comm).__name__ == expected, type(comm).__name__
    assert comm.world_size == int(os.environ.get("PMI_SIZE", comm.world_size))
    if mode == "collectives":
        check_collectives(comm)
        check_zero(comm)
    elif mode == "hang":
        if comm.rank == comm.world_size - 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        comm.all_reduce_(dev(np.ones(4, dtype=np.float32)))
        raise SystemExit("the all-reduce returned although a rank was stopped")
    print(f"rank {comm.rank} ok ({type(comm).__name__}, {mg.get_backend()})", flush=True)


if __name__ == "__main__":
    main()
