"""ZeRO-1: AdamW with its moments sharded across the ranks (llm.c's scheme, from the ZeRO paper).

Plain data parallelism keeps a full copy of everything on every rank: weights, gradients and
AdamW's two moments m and v. The moments are twice the size of the weights, and every rank
updates every weight with exactly the same numbers: N ranks do the same work N times. ZeRO
stage 1 splits that work instead:

    all parameters, flattened:  [ p0 ........ | p1 ... | p2 ............. | pad ]
    rank 0 owns items           [ shard 0          )
    rank 1 owns items                              [ shard 1                  )

    1. reduce-scatter the flat gradients: rank r gets the *average* of shard r only
    2. rank r runs AdamW on shard r: its weights, its m and v (1/N of the moments)
    3. all-gather the updated weight shards: every rank has every new weight again

Reduce-scatter + all-gather move the same bytes as one all-reduce (an all-reduce *is* a
reduce-scatter followed by an all-gather, in the ring algorithm), so the communication is the
same as plain data parallelism while the optimizer memory and work per rank fall as 1/N.

AdamW is elementwise, so updating a slice of a parameter with its slice of m and v gives
bit-for-bit the numbers the unsharded AdamW computes (the same `kernels.adamw_update_`), and
`consolidated()` gathers the moments back into a plain AdamW whose checkpoint is the same file
unsharded training writes.
"""

from __future__ import annotations

import math

from . import backend, kernels
from .distributed import Communicator, flatten_into, grads_or_zeros, unflatten_from
from .optim import AdamW, sum_of_squares


class ZeroAdamW(AdamW):
    """AdamW whose moments live sharded across the ranks of `comm`.

        opt = ZeroAdamW(model.parameters(), comm, lr=4e-4, weight_decay=0.1)
        loss.backward()
        opt.reduce_gradients()          # collective: this rank's shard of the averaged gradient
        norm = opt.clip_grad_norm_(1.0) # the global norm (collective), clipping the shard
        opt.step()                      # update this shard, all-gather the weights (collective)

    `step()` reduces the gradients itself if `reduce_gradients()` was not called. After the
    reduction the parameters' own `.grad` are released (they held this rank's un-averaged
    gradient); the averaged one lives only as this rank's shard. A parameter without a gradient
    counts as a zero gradient (plain AdamW would skip it). Every method marked collective must
    be called by every rank, in the same order.
    """

    def __init__(self, params, comm: Communicator, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.01):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.comm = comm
        xp = backend.xp
        params = self._all_params()
        self.dtype = params[0].dtype
        self.total = sum(p.size for p in params)
        world = comm.world_size
        self.shard_size = -(-self.total // world)                # ceil: the last shard is padded
        self.lo = comm.rank * self.shard_size
        self.hi = min(self.lo + self.shard_size, self.total)
        # The pieces of parameters inside [lo, hi): (param index, group, start and end within the
        # flattened parameter, start within the shard).
        self.pieces = []
        offset = 0
        for i, p, g in self._indexed():
            a, b = max(self.lo, offset), min(self.hi, offset + p.size)
            if a < b:
                self.pieces.append((i, g, a - offset, b - offset, a - self.lo))
            offset += p.size
        self.flat = xp.zeros(self.shard_size * world, dtype=self.dtype)   # gradients in, weights out
        self.grad_shard = xp.zeros(self.shard_size, dtype=self.dtype)
        self.weight_shard = xp.zeros(self.shard_size, dtype=self.dtype)  # all-gather's send buffer
        self.m = xp.zeros(self.shard_size, dtype=self.dtype)
        self.v = xp.zeros(self.shard_size, dtype=self.dtype)
        self._reduced = False

    @classmethod
    def from_adamw(cls, opt: AdamW, comm: Communicator) -> ZeroAdamW:
        """Shard an existing AdamW (fresh, or restored from a checkpoint): the same parameter
        groups and hyper-parameters, this rank's slice of its moments, its step count."""
        g0 = opt.param_groups[0]
        zero = cls(opt.param_groups, comm, lr=g0["lr"], betas=g0["betas"], eps=g0["eps"],
                   weight_decay=g0["weight_decay"])     # each group keeps its own settings
        zero._load_full_state(opt.state, opt.step_count)
        return zero

    def _load_full_state(self, full_state: list[dict], step_count: int) -> None:
        """Take this rank's slice of full (unsharded) moments."""
        self.step_count = int(step_count)
        self.m[...] = 0
        self.v[...] = 0
        for i, _, a, b, s in self.pieces:
            st = full_state[i]
            if "m" in st:
                self.m[s:s + b - a] = st["m"].reshape(-1)[a:b]
                self.v[s:s + b - a] = st["v"].reshape(-1)[a:b]

    # -- the step ------------------------------------------------------------------------------
    def reduce_gradients(self) -> None:
        """Collective: average the gradients over the ranks, keeping only this rank's shard."""
        params = self._all_params()
        self.flat[self.total:] = 0
        flatten_into(grads_or_zeros(params), self.flat)
        self.comm.reduce_scatter(self.flat, self.grad_shard)
        for p in params:
            p.grad = None          # un-averaged and no longer needed: free it
        self._reduced = True

    def grad_norm(self) -> float:
        """Collective: the L2 norm of the whole averaged gradient (nan/inf if any item is), as
        `optim.grad_norm`: each rank's sum of squares over its shard, summed over the ranks."""
        if not self._reduced:
            self.reduce_gradients()
        local = sum_of_squares([self.grad_shard])                # the padding is zero
        return math.sqrt(float(self.comm.all_reduce_scalars([local])[0]))

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Collective: scale the gradient so its global norm is at most `max_norm` (as
        `optim.clip_grad_norm_`); returns the norm before clipping."""
        total = self.grad_norm()
        if max_norm > 0 and total > max_norm:
            self.grad_shard *= self.dtype.type(max_norm / (total + 1e-6))
        return total

    def zero_grad(self) -> None:
        super().zero_grad()
        self._reduced = False

    def step(self) -> None:
        """Collective: AdamW on this rank's shard, then every rank gets every updated weight."""
        if not self._reduced:
            self.reduce_gradients()
        self.step_count += 1
        t = self.step_count
        params = self._all_params()
        for i, g, a, b, s in self.pieces:
            lr, (b1, b2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
            w = params[i].data.reshape(-1)[a:b]             # a view: updated in place
            kernels.adamw_update_(w, self.grad_shard[s:s + b - a], self.m[s:s + b - a],
                                  self.v[s:s + b - a], lr, b1, b2, eps, wd, t)
            self.weight_shard[s:s + b - a] = w
        self.comm.all_gather_(self.weight_shard, self.flat)
        unflatten_from(self.flat, [p.data for p in params])
        self._reduced = False

    # -- memory and checkpoints ----------------------------------------------------------------
    def _unsharded(self, step_count: int) -> AdamW:
        """A plain AdamW over the same parameter groups, with empty moments."""
        full = AdamW.__new__(AdamW)
        full.param_groups = self.param_groups
        full.step_count = step_count
        full.state = [dict() for _ in self._all_params()]
        return full

    def state_bytes(self) -> int:
        """Bytes of optimizer state (m and v) held by this rank."""
        return int(self.m.nbytes + self.v.nbytes)

    def consolidated(self) -> AdamW:
        """Collective: a plain AdamW over the same parameters holding the full moments (every
        rank gets one), for writing the same checkpoint as unsharded training."""
        xp = backend.xp
        full = self._unsharded(self.step_count)
        if self.step_count == 0:
            return full
        gathered = xp.empty(self.shard_size * self.comm.world_size, dtype=self.dtype)
        for name, shard in (("m", self.m), ("v", self.v)):
            self.comm.all_gather_(shard, gathered)
            offset = 0
            for st, p in zip(full.state, self._all_params()):
                st[name] = gathered[offset:offset + p.size].reshape(p.shape).copy()
                offset += p.size
        return full

    def state_dict(self) -> dict:
        """Collective: the checkpoint of the unsharded AdamW (see `consolidated`)."""
        return self.consolidated().state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Load an unsharded AdamW state (any number of ranks wrote it) and keep this rank's slice."""
        full = self._unsharded(0)
        full.load_state_dict(state)
        self._load_full_state(full.state, full.step_count)
