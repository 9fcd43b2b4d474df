"""Collectives for data-parallel training: N copies of one program ("ranks") that keep identical
weights by averaging their gradients every step.

    comm = distributed.init()               # one rank, or every rank started by `mpiexec -n N`
    comm.rank, comm.world_size, comm.local_rank
    comm.all_reduce_(flat_grads)            # in place: every rank ends with the average
    comm.reduce_scatter(flat, shard)        # shard k of the average lands on rank k (ZeRO-1)
    comm.all_gather_(shard, flat)           # every rank's shard, concatenated on every rank

Three communicators behind one interface:

* `SingleProcess`: world size 1; every collective is a copy or nothing. Training code calls the
  same methods whether it runs alone or not.
* `MPICommunicator`: mpi4py on NumPy arrays (CPU ranks), started with `mpiexec -n N`.
* `NCCLCommunicator`: NCCL through CuPy (`cupy.cuda.nccl`) on device arrays, one GPU per rank
  (chosen by the local rank); MPI still starts the ranks, hands out NCCL's unique id and
  carries the small host-side messages (scalars, objects).

Every collective works on ONE flat, contiguous buffer: gradients are copied into a flat bucket
first (`flatten_into`), so a step costs one call, not one per parameter (a call has a fixed
latency; 150 small calls would cost 150 of them).

A rank that dies or hangs would leave the others waiting inside a collective forever. So every
collective here is started non-blocking and polled against a deadline (`timeout`, default
DEFAULT_TIMEOUT seconds or $MINIGRAD_DIST_TIMEOUT); past it the rank prints one line saying so
and aborts the whole job (MPI_Abort), which stops every rank.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

import numpy as np

from . import backend

DEFAULT_TIMEOUT = 300.0   # seconds a collective waits for the slowest rank (a first step may be slow)
ABORT_DRAIN_SECONDS = 1.0  # pause between printing why and MPI_Abort, so mpiexec forwards the message
MPI_INSTALL_HINT = 'install the MPI extra: pip install -e ".[mpi]" (mpi4py and MPICH)'


class DistributedError(RuntimeError):
    """A data-parallel set-up that cannot work (mpi4py missing, mismatched ranks, ...)."""


def launched_world_size() -> int:
    """How many ranks the launcher started (1 when not started by mpiexec/srun), read from the
    environment so that a single process never needs mpi4py."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 when not started by mpiexec/srun), for the
    few things decided before MPI starts (only rank 0 reports a bad command line)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def default_timeout() -> float:
    value = os.environ.get("MINIGRAD_DIST_TIMEOUT")
    if not value:
        return DEFAULT_TIMEOUT
    try:
        timeout = float(value)
    except ValueError:
        raise DistributedError(f"MINIGRAD_DIST_TIMEOUT must be a number of seconds, got {value!r}; set it "
                               "to e.g. 600, or unset it for the default") from None
    if not timeout > 0:
        raise DistributedError(f"MINIGRAD_DIST_TIMEOUT must be > 0 seconds, got {value!r}; set it to e.g. "
                               "600, or unset it for the default")
    return timeout


def init(timeout: float | None = None) -> Communicator:
    """The communicator of this process: `SingleProcess` when run alone, else MPI between the
    ranks that mpiexec started (NCCL when the backend is cupy). Call it after choosing the
    backend (`minigrad.set_backend`) and before building the model: on GPUs it selects this
    rank's device."""
    timeout = default_timeout() if timeout is None else float(timeout)
    if launched_world_size() <= 1:
        return SingleProcess()
    try:
        from mpi4py import MPI  # noqa: PLC0415 - only multi-rank runs need it
    except ImportError as exc:
        raise DistributedError(f"this process was started by mpiexec with {launched_world_size()} ranks, "
                               f"but mpi4py cannot be imported ({exc}); {MPI_INSTALL_HINT}") from None
    return for_backend(MPICommunicator(MPI.COMM_WORLD, timeout))


def select_device(comm: Communicator) -> None:
    """On the cupy backend, make this rank's GPU (local rank modulo the GPUs here) the current
    device, before any array is made. No communication; nothing to do on NumPy."""
    if backend.get_backend() == "cupy":
        cp = backend.xp
        cp.cuda.Device(comm.local_rank % cp.cuda.runtime.getDeviceCount()).use()


def for_backend(comm: Communicator) -> Communicator:
    """The communicator for the backend now in use: an MPI one becomes NCCL once the backend is
    cupy (the CLI picks the backend after starting MPI); anything else is returned as is.
    A collective (the NCCL id is broadcast): every rank calls it."""
    if isinstance(comm, MPICommunicator) and backend.get_backend() == "cupy":
        return NCCLCommunicator(comm)
    return comm


def flatten_into(arrays, out):
    """Copy arrays one after the other into the flat buffer `out` (its first sum(sizes) items)."""
    offset = 0
    for a in arrays:
        out[offset:offset + a.size] = a.reshape(-1)
        offset += a.size
    return out


def grads_or_zeros(params) -> list:
    """Each parameter's gradient, or zeros for one that got none this step (not used by this
    rank's batch): every rank must send the same layout of the same size."""
    xp = backend.xp
    return [p.grad if p.grad is not None else xp.zeros(p.shape, dtype=p.dtype) for p in params]


def unflatten_from(flat, arrays) -> None:
    """The reverse of `flatten_into`: copy consecutive slices of `flat` back into `arrays`."""
    offset = 0
    for a in arrays:
        a[...] = flat[offset:offset + a.size].reshape(a.shape)
        offset += a.size


class Communicator:
    """The interface. `rank` runs 0..world_size-1; `local_rank` counts the ranks on this machine
    (it picks the GPU). Buffers are flat and contiguous, of the backend's array type; the
    reducing collectives average (divide the sum by world_size) unless `average=False`.
    `seconds` and `calls` accumulate the time spent inside collectives (for measurements)."""

    rank = 0
    world_size = 1
    local_rank = 0
    name = "single"

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    # -- array collectives -----------------------------------------------------------------------
    def all_reduce_(self, buf, average: bool = True):
        """Sum (or average) `buf` over the ranks, in place: every rank gets the same result."""
        raise NotImplementedError

    def reduce_scatter(self, buf, out, average: bool = True):
        """`buf` (world_size * k items) summed over the ranks; rank r gets items [r k, (r+1) k)
        of the sum (or average) in `out` (k items)."""
        raise NotImplementedError

    def all_gather_(self, shard, out):
        """Every rank's `shard` (k items), concatenated in rank order into `out` (world_size * k)."""
        raise NotImplementedError

    # -- host-side helpers (small) ----------------------------------------------------------------
    def all_reduce_scalars(self, values, op: str = "sum") -> np.ndarray:
        """A few floats combined over the ranks ("sum", "max" or "min"), as a float64 NumPy array."""
        raise NotImplementedError

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any rank (stop requests, errors)."""
        return bool(self.all_reduce_scalars([1.0 if flag else 0.0], op="max")[0] > 0)

    def all_gather_object(self, obj) -> list:
        """A small picklable object from every rank, as a list in rank order (on every rank)."""
        raise NotImplementedError

    def broadcast_object(self, obj, root: int = 0):
        """Rank `root`'s small picklable object, on every rank."""
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def _check_scatter_sizes(self, buf, out) -> None:
        if buf.size != out.size * self.world_size:
            raise DistributedError(f"reduce-scatter of {buf.size} items into shards of {out.size} on "
                                   f"{self.world_size} ranks")

    def abort(self, code: int = 1) -> None:
        """Stop every rank now (after an error only some ranks saw)."""
        raise SystemExit(code)

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"


class SingleProcess(Communicator):
    """World size 1: collectives are copies or nothing, so one code path serves both cases."""

    def all_reduce_(self, buf, average=True):
        return buf

    def reduce_scatter(self, buf, out, average=True):
        out[...] = buf[:out.size]
        return out

    def all_gather_(self, shard, out):
        out[:shard.size] = shard
        return out

    def all_reduce_scalars(self, values, op="sum"):
        return np.asarray(values, dtype=np.float64).copy()

    def all_gather_object(self, obj):
        return [obj]

    def broadcast_object(self, obj, root=0):
        return obj

    def barrier(self):
        pass


class MPICommunicator(Communicator):
    """MPI (mpi4py) between processes, on NumPy buffers."""

    name = "mpi"

    def __init__(self, comm, timeout: float = DEFAULT_TIMEOUT):
        super().__init__()
        from mpi4py import MPI  # noqa: PLC0415

        self.MPI = MPI
        self.comm = comm
        self.timeout = float(timeout)
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()
        # Ranks that share this machine's memory, numbered 0.. : the GPU this rank should use.
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = node.Get_rank()
        node.Free()

    def wait(self, request, what: str) -> None:
        """Poll `request` until it completes; past the deadline, report and abort every rank.

        Polling also drives MPI's progress (MPICH moves non-blocking collectives forward inside
        Test), so it spins at first and only then sleeps a little between polls, to leave the
        core to a rank's other threads while waiting for a slow peer."""
        start = time.perf_counter()
        polls = 0
        while not request.Test():
            polls += 1
            now = time.perf_counter()
            if now - start > self.timeout:
                self.timed_out(what)
            if now - start > 0.02:
                time.sleep(0.0005 if polls % 16 else 0.002)
        self.seconds += time.perf_counter() - start
        self.calls += 1

    def timed_out(self, what: str) -> None:
        print(f"error: rank {self.rank} of {self.world_size}: {what} waited {self.timeout:g} s for the "
              "other ranks, so one of them died or hung (see its messages); stopping every rank "
              "(the wait is set by MINIGRAD_DIST_TIMEOUT)", file=sys.stderr, flush=True)
        self.abort(1)

    def _check(self, buf) -> None:
        if not isinstance(buf, np.ndarray) or not buf.flags.c_contiguous:
            raise DistributedError("MPI collectives need contiguous NumPy buffers")

    def all_reduce_(self, buf, average=True):
        self._check(buf)
        self.wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM), "all-reduce")
        if average:
            buf /= buf.dtype.type(self.world_size)
        return buf

    def reduce_scatter(self, buf, out, average=True):
        self._check(buf)
        self._check(out)
        self._check_scatter_sizes(buf, out)
        self.wait(self.comm.Ireduce_scatter_block(buf, out, op=self.MPI.SUM), "reduce-scatter")
        if average:
            out /= out.dtype.type(self.world_size)
        return out

    def all_gather_(self, shard, out):
        self._check(shard)
        self._check(out)
        self.wait(self.comm.Iallgather(shard, out), "all-gather")
        return out

    def all_reduce_scalars(self, values, op="sum"):
        ops = {"sum": self.MPI.SUM, "max": self.MPI.MAX, "min": self.MPI.MIN}
        buf = np.array(values, dtype=np.float64)
        self.wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=ops[op]), "all-reduce")
        return buf

    def barrier(self):
        self.wait(self.comm.Ibarrier(), "barrier")

    # Objects go through mpi4py's pickling collectives, which are blocking: a barrier with a
    # deadline first makes sure every rank has arrived, so they cannot hang. (These are our own
    # in-memory objects passed between our own ranks, never a file a user gave us.)
    def all_gather_object(self, obj):
        self.barrier()
        return self.comm.allgather(obj)

    def broadcast_object(self, obj, root=0):
        self.barrier()
        return self.comm.bcast(obj, root=root)

    def abort(self, code=1):
        # What this rank just printed (why it aborts) sits in a pipe to mpiexec's launcher until
        # the launcher forwards it; MPI_Abort makes the launcher kill every rank and exit, and on
        # a busy machine it can do so before forwarding, losing the message (seen under load in
        # CI). A moment's pause before aborting lets it drain; the job is ending anyway.
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_DRAIN_SECONDS)
        self.comm.Abort(code)


class NCCLCommunicator(Communicator):
    """NCCL (through CuPy) on device buffers, one GPU per rank; MPI for everything on the host.

    NCCL works on raw device pointers: `allReduce(send_ptr, recv_ptr, count, dtype, op, stream)`
    queues the collective on a CUDA stream and returns at once. To keep the dead-rank deadline,
    an event recorded after it is polled; past the deadline NCCL's communicator is aborted (which
    frees the stuck kernel) and then MPI stops every rank."""

    name = "nccl"

    def __init__(self, mpi: MPICommunicator):
        super().__init__()
        self.mpi = mpi
        self.rank, self.world_size, self.local_rank = mpi.rank, mpi.world_size, mpi.local_rank
        self.timeout = mpi.timeout
        cp = backend.xp
        self.cp = cp
        # `cupy.cuda.nccl` is a submodule that `import cupy` does not load by itself.
        self.nccl = getattr(cp.cuda, "nccl", None) or importlib.import_module(cp.__name__ + ".cuda.nccl")
        if not self.nccl.available:
            raise DistributedError("NCCL is not available to CuPy; install it with pip install "
                                   '"nvidia-nccl-cu12" (or -cu13), or train with --backend numpy')
        select_device(self)
        uid = self.nccl.get_unique_id() if self.rank == 0 else None
        uid = mpi.broadcast_object(uid)              # every rank joins the same NCCL clique
        self.comm = self.nccl.NcclCommunicator(self.world_size, uid, self.rank)
        self._dtypes = {np.dtype(np.float32): self.nccl.NCCL_FLOAT32,
                        np.dtype(np.float64): self.nccl.NCCL_FLOAT64,
                        np.dtype(np.float16): self.nccl.NCCL_FLOAT16}

    def _dtype(self, buf) -> int:
        if not buf.flags.c_contiguous or np.dtype(buf.dtype) not in self._dtypes:
            raise DistributedError("NCCL collectives need contiguous float device buffers")
        return self._dtypes[np.dtype(buf.dtype)]

    def _finish(self, start: float, what: str) -> None:
        stream = self.cp.cuda.get_current_stream()
        event = stream.record()
        while not event.done:
            if time.perf_counter() - start > self.timeout:
                self.comm.abort()
                self.mpi.timed_out(what)
            time.sleep(0.0002)
        self.seconds += time.perf_counter() - start
        self.calls += 1

    def _stream(self) -> int:
        return self.cp.cuda.get_current_stream().ptr

    def all_reduce_(self, buf, average=True):
        start = time.perf_counter()
        ptr = buf.data.ptr
        self.comm.allReduce(ptr, ptr, buf.size, self._dtype(buf), self.nccl.NCCL_SUM, self._stream())
        self._finish(start, "all-reduce")
        if average:
            buf /= buf.dtype.type(self.world_size)
        return buf

    def reduce_scatter(self, buf, out, average=True):
        self._check_scatter_sizes(buf, out)
        start = time.perf_counter()
        self.comm.reduceScatter(buf.data.ptr, out.data.ptr, out.size, self._dtype(buf),
                                self.nccl.NCCL_SUM, self._stream())
        self._finish(start, "reduce-scatter")
        if average:
            out /= out.dtype.type(self.world_size)
        return out

    def all_gather_(self, shard, out):
        start = time.perf_counter()
        self.comm.allGather(shard.data.ptr, out.data.ptr, shard.size, self._dtype(shard), self._stream())
        self._finish(start, "all-gather")
        return out

    def all_reduce_scalars(self, values, op="sum"):
        return self.mpi.all_reduce_scalars(values, op)

    def all_gather_object(self, obj):
        return self.mpi.all_gather_object(obj)

    def broadcast_object(self, obj, root=0):
        return self.mpi.broadcast_object(obj, root)

    def barrier(self):
        self.mpi.barrier()

    def abort(self, code=1):
        self.mpi.abort(code)


# ---------------------------------------------------------------------------------------------
# Data-parallel gradients
# ---------------------------------------------------------------------------------------------

class GradientBucket:
    """Average the gradients of `params` over the ranks with one all-reduce on one flat buffer.

        bucket = GradientBucket(model.parameters(), comm)
        loss.backward()
        bucket.average_()        # p.grad is now the mean of every rank's p.grad

    The flat buffer is allocated once and reused every step (as large as the parameters); after
    `average_()` each p.grad is a view of its slice of it, valid until the next `average_()`."""

    def __init__(self, params, comm: Communicator):
        self.params = list(params)
        self.comm = comm
        self.size = sum(p.size for p in self.params)
        self.flat = None

    def average_(self) -> None:
        if self.comm.world_size == 1:
            return
        grads = grads_or_zeros(self.params)
        if self.flat is None or self.flat.dtype != grads[0].dtype:
            self.flat = backend.xp.empty(self.size, dtype=grads[0].dtype)
        self.comm.all_reduce_(flatten_into(grads, self.flat))
        # Each gradient becomes a view of its slice of the averaged buffer (no copy back).
        offset = 0
        for p in self.params:
            p.grad = self.flat[offset:offset + p.size].reshape(p.shape)
            offset += p.size
