"""cupy.cuda.nccl for the stand-in (`cupy_standin.cuda.nccl`, as in CuPy): NCCL's communicator
imitated over MPI (mpi4py).

The real `cupy.cuda.nccl.NcclCommunicator` takes raw device pointers (`array.data.ptr`), an
element count, an NCCL datatype and op, and a CUDA stream pointer. Stand-in arrays report the
host address of their first element as `.data.ptr`, so this module reads and writes the same
memory through those addresses and runs the collective with MPI between the processes that
mpiexec started: minigrad's NCCL code path (pointers, counts, dtypes, the unique id handed out
over MPI) runs unchanged without a GPU.

Signatures are CuPy 14.2's (`cupy_backends/cuda/libs/nccl.pyx`):

    get_unique_id() -> bytes                       (128 bytes; CuPy < 14 returned a tuple)
    NcclCommunicator(int ndev, bytes commId, int rank, NcclConfig config=None)
    .allReduce(intptr_t sendbuf, intptr_t recvbuf, size_t count, int datatype, int op, intptr_t stream)
    .reduceScatter(intptr_t sendbuf, intptr_t recvbuf, size_t recvcount, int datatype, int op,
                   intptr_t stream)
    .allGather(intptr_t sendbuf, intptr_t recvbuf, size_t count, int datatype, intptr_t stream)
    .broadcast(intptr_t sendbuff, intptr_t recvbuff, size_t count, int datatype, int root,
               intptr_t stream)
    .bcast(intptr_t buff, size_t count, int datatype, int root, intptr_t stream)
    .rank_id(), .size(), .device_id(), .abort(), .destroy(), .check_async_error()

Like NCCL's, these collectives block only the "stream": here they complete before returning.
What it cannot imitate: a hang inside NCCL (MPI's blocking call would hang instead; minigrad
bounds the wait with its own deadline on both).
"""

from __future__ import annotations

import ctypes
import operator
import os

import numpy as np

available = True

# NCCL's enums (nccl.h), the values CuPy exports.
NCCL_INT8 = NCCL_CHAR = 0
NCCL_UINT8 = 1
NCCL_INT32 = NCCL_INT = 2
NCCL_UINT32 = 3
NCCL_INT64 = 4
NCCL_UINT64 = 5
NCCL_FLOAT16 = NCCL_HALF = 6
NCCL_FLOAT32 = NCCL_FLOAT = 7
NCCL_FLOAT64 = NCCL_DOUBLE = 8
NCCL_BFLOAT16 = 9
NCCL_SUM, NCCL_PROD, NCCL_MAX, NCCL_MIN, NCCL_AVG = 0, 1, 2, 3, 4

_DTYPES = {NCCL_INT8: np.int8, NCCL_UINT8: np.uint8, NCCL_INT32: np.int32, NCCL_UINT32: np.uint32,
           NCCL_INT64: np.int64, NCCL_UINT64: np.uint64, NCCL_FLOAT16: np.float16,
           NCCL_FLOAT32: np.float32, NCCL_FLOAT64: np.float64}


class NcclError(RuntimeError):
    """As cupy_backends.cuda.libs.nccl.NcclError."""


def get_unique_id() -> bytes:
    """Fetch the NCCL unique ID as a Python bytes object (128 bytes)."""
    return os.urandom(128)


def groupStart():  # noqa: N802 - NCCL's name
    return None


def groupEnd():  # noqa: N802
    return None


def _int(value, name: str) -> int:
    """Cython's conversion for an intptr_t/size_t/int argument: integers only."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"an integer is required for {name}, got {type(value).__name__}") from None


def _view(ptr: int, count: int, datatype: int) -> np.ndarray:
    """The `count` elements of type `datatype` at address `ptr`, as a writable NumPy view."""
    if datatype not in _DTYPES:
        raise NcclError("NCCL_ERROR_INVALID_ARGUMENT: unsupported datatype")
    dtype = np.dtype(_DTYPES[datatype])
    if count == 0:
        return np.empty(0, dtype=dtype)
    if ptr == 0:
        raise NcclError("NCCL_ERROR_INVALID_ARGUMENT: null buffer")
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count)


class NcclCommunicator:
    def __init__(self, ndev, commId, rank, config=None):  # noqa: N803 - CuPy's names
        ndev, rank = _int(ndev, "ndev"), _int(rank, "rank")
        if not isinstance(commId, bytes):
            raise TypeError("Argument 'commId' has incorrect type (expected bytes, got "
                            f"{type(commId).__name__})")
        from mpi4py import MPI  # noqa: PLC0415

        self._MPI = MPI
        self._comm = MPI.COMM_WORLD
        if self._comm.Get_size() != ndev or self._comm.Get_rank() != rank:
            raise NcclError(f"NCCL_ERROR_INVALID_ARGUMENT: rank {rank} of {ndev} does not match the MPI "
                            f"world (rank {self._comm.Get_rank()} of {self._comm.Get_size()})")
        if len(set(self._comm.allgather(commId))) != 1:   # NCCL would hang: ranks in different cliques
            raise NcclError("NCCL_ERROR_INVALID_USAGE: the ranks were given different unique ids")
        self._ndev, self._rank, self._alive = ndev, rank, True
        self._ops = {NCCL_SUM: MPI.SUM, NCCL_PROD: MPI.PROD, NCCL_MAX: MPI.MAX, NCCL_MIN: MPI.MIN}

    def _check(self):
        if not self._alive:
            raise NcclError("NCCL_ERROR_INVALID_USAGE: the communicator was destroyed or aborted")

    def _op(self, op):
        if op == NCCL_AVG:
            return self._MPI.SUM
        if op not in self._ops:
            raise NcclError("NCCL_ERROR_INVALID_ARGUMENT: unsupported reduction op")
        return self._ops[op]

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):  # noqa: N802
        self._check()
        send, recv = _int(sendbuf, "sendbuf"), _int(recvbuf, "recvbuf")
        count, datatype, op, _ = _int(count, "count"), _int(datatype, "datatype"), _int(op, "op"), \
            _int(stream, "stream")
        out = _view(recv, count, datatype)
        src = self._MPI.IN_PLACE if send == recv else _view(send, count, datatype).copy()
        self._comm.Allreduce(src, out, op=self._op(op))
        if op == NCCL_AVG:
            out /= out.dtype.type(self._ndev)

    def reduceScatter(self, sendbuf, recvbuf, recvcount, datatype, op, stream):  # noqa: N802
        self._check()
        send, recv = _int(sendbuf, "sendbuf"), _int(recvbuf, "recvbuf")
        count, datatype, op, _ = _int(recvcount, "recvcount"), _int(datatype, "datatype"), _int(op, "op"), \
            _int(stream, "stream")
        src = _view(send, count * self._ndev, datatype).copy()
        out = _view(recv, count, datatype)
        self._comm.Reduce_scatter_block(src, out, op=self._op(op))
        if op == NCCL_AVG:
            out /= out.dtype.type(self._ndev)

    def allGather(self, sendbuf, recvbuf, count, datatype, stream):  # noqa: N802
        self._check()
        send, recv = _int(sendbuf, "sendbuf"), _int(recvbuf, "recvbuf")
        count, datatype, _ = _int(count, "count"), _int(datatype, "datatype"), _int(stream, "stream")
        src = _view(send, count, datatype).copy()
        self._comm.Allgather(src, _view(recv, count * self._ndev, datatype))

    def broadcast(self, sendbuff, recvbuff, count, datatype, root, stream):
        self._check()
        send, recv = _int(sendbuff, "sendbuff"), _int(recvbuff, "recvbuff")
        count, datatype, root, _ = _int(count, "count"), _int(datatype, "datatype"), _int(root, "root"), \
            _int(stream, "stream")
        out = _view(recv, count, datatype)
        if self._rank == root and send != recv:
            out[...] = _view(send, count, datatype)
        self._comm.Bcast(out, root=root)

    def bcast(self, buff, count, datatype, root, stream):
        self.broadcast(buff, buff, count, datatype, root, stream)

    def rank_id(self):
        return self._rank

    def size(self):
        return self._ndev

    def device_id(self):
        return 0

    def check_async_error(self):
        return None

    def abort(self):
        self._alive = False

    def destroy(self):
        self._alive = False
