"""The training loop's extras (gpt2/train.py names each where it uses it). Off by default: with
TrainConfig's defaults every one of them does nothing, and the loop is the book's.

    steps_of        --grad-accum: the batches whose gradients are summed into one step
    accumulate_gradients   forward and backward of those batches
    lr_schedule     linear warmup, then cosine decay to a floor (--warmup-steps, --min-lr)
    Ranks           data parallel: each rank its rows of the batch; gradients and loss averaged
                    over the ranks, then clipped (--grad-clip)
    NonFiniteGuard  a NaN or infinite loss or gradient stops the run before the update, or skips
                    the step (--skip-nonfinite)
    Progress        the tqdm bar (tokens/s) and the lines the loop prints
"""

from __future__ import annotations

import functools
import math
import time

import numpy as np

from minigrad import distributed
from minigrad.optim import WarmupCosine, clip_grad_norm_, grad_norm
from minigrad.zero import ZeroAdamW

from .errors import GPT2Error
from .evaluate import calc_loss_batch

DEFAULT_MIN_LR_RATIO = 0.1   # the cosine schedule ends at lr / 10 unless told otherwise (nanoGPT's)


def schedule_floor(peak: float, min_lr: float | None) -> float:
    """Where the cosine ends: `min_lr`, or the peak / 10 when none is given."""
    return peak * DEFAULT_MIN_LR_RATIO if min_lr is None else min_lr


# ---------------------------------------------------------------------------------------------
# Gradient accumulation
# ---------------------------------------------------------------------------------------------

def steps_per_epoch(train_loader, grad_accum: int) -> int:
    """Optimizer steps per epoch: each takes `grad_accum` batches (an epoch's leftover batches,
    fewer than grad_accum, are skipped, as drop_last skips a short batch)."""
    return len(train_loader) // grad_accum


def steps_of(train_loader, grad_accum: int):
    """The rest of the loader's current epoch, `grad_accum` batches at a time, as
    (batches, position) with position the fraction of the epoch done after them."""
    first = train_loader.batch_index        # > 0 only when resuming mid-epoch
    group = []
    for i, batch in enumerate(train_loader):
        group.append(batch)
        if len(group) == grad_accum:
            yield group, (first + i + 1) / len(train_loader)
            group = []


def accumulate_gradients(model, batches, loss_fn=calc_loss_batch) -> float:
    """Forward and backward every batch, leaving the summed gradient in p.grad; returns the mean
    loss.

    With N batches of B windows, loss_k / N summed over k is the mean cross-entropy over all
    N*B*T predictions -- the loss of one batch of N*B windows -- and since gradients add
    (backward accumulates into p.grad), N backward passes of loss_k / N leave exactly that
    batch's gradient, in the memory of one small batch. One batch (N = 1) is the plain step,
    with no scaling at all.
    """
    n = len(batches)
    total = 0.0
    for batch in batches:
        loss = loss_fn(*batch, model)         # forward: logits (B, T, V) -> scalar
        if n > 1:
            loss = loss * (1.0 / n)
        loss.backward()                       # adds into p.grad for every parameter
        total += loss.item()
    return total


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------

def lr_schedule(optimizer, warmup_steps: int | None, min_lr: float | None, total_steps: int):
    """Warmup + cosine over the run's `total_steps` (None: a constant lr, the book's).

    The peak is the optimizer's lr when training first started, kept in its state as
    "initial_lr" so a resumed run rebuilds the same schedule although "lr" has moved on since.
    The decay ends on the floor at the run's last step (index total_steps - 1), wherever
    --epochs or --max-steps puts it.
    """
    if warmup_steps is None:
        return None
    group = optimizer.param_groups[0]
    peak = group.setdefault("initial_lr", group["lr"])
    return WarmupCosine(max_lr=peak, warmup_steps=warmup_steps, total_steps=max(total_steps - 1, 0),
                        min_lr=schedule_floor(peak, min_lr))


# ---------------------------------------------------------------------------------------------
# Ranks: data parallelism, and clipping
# ---------------------------------------------------------------------------------------------

class Ranks:
    """Data parallelism's part in a step, and the gradient clipping that follows it.

    With `comm` (a minigrad.distributed communicator of N ranks, every rank calling train() with
    the same model, optimizer and loader), each loader batch is the *global* batch: rank r
    trains on rows [r B, (r+1) B), B = rows / N. Between backward and the update the gradients
    are averaged over the ranks, then clipped; the loss is averaged too, so the NaN guard and the
    log see the global batch's loss on every rank and every rank takes the same step. ZeRO-1
    (ZeroAdamW) keeps only its shard of the averaged gradient. One rank: nothing to average.
    """

    def __init__(self, model, optimizer, comm=None):
        self.model, self.optimizer = model, optimizer
        self.comm = comm if comm is not None else distributed.SingleProcess()
        self.size = self.comm.world_size
        self.bucket = None
        if self.size > 1 and not isinstance(optimizer, ZeroAdamW):
            self.bucket = distributed.GradientBucket(model.parameters(), self.comm)

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.size:
            raise GPT2Error(f"the loader's batch of {batch_size} windows does not split evenly over "
                            f"{self.size} ranks; give it a batch of ranks x per-rank batch")

    def own_rows(self, batches):
        """This rank's rows of each global batch."""
        return batches if self.size == 1 else [rank_slice(*batch, comm=self.comm) for batch in batches]

    def average(self, loss: float, grad_clip: float | None) -> tuple[float, float]:
        """Average the gradients (and `loss`) over the ranks, clip; returns (loss, gradient
        norm), both the same on every rank."""
        if isinstance(self.optimizer, ZeroAdamW):
            self.optimizer.reduce_gradients()
            norm = (self.optimizer.clip_grad_norm_(grad_clip) if grad_clip is not None
                    else self.optimizer.grad_norm())
        else:
            if self.bucket is not None:
                self.bucket.average_()
            params = self.model.parameters()
            norm = clip_grad_norm_(params, grad_clip) if grad_clip is not None else grad_norm(params)
        if self.size > 1:                     # the global batch's loss
            loss = float(self.comm.all_reduce_scalars([loss])[0]) / self.size
        return loss, norm


def rank_slice(*arrays, comm):
    """This rank's rows of a global batch's arrays: rank r of N takes rows [r B, (r+1) B), B = rows / N."""
    if comm.world_size == 1:
        return arrays
    b = len(arrays[0]) // comm.world_size
    return tuple(a[comm.rank * b:(comm.rank + 1) * b] for a in arrays)


# ---------------------------------------------------------------------------------------------
# The NaN guard
# ---------------------------------------------------------------------------------------------

class NonFiniteError(GPT2Error):
    """The loss or the gradient became NaN or infinite at `step`; the update was not applied, so
    the model still holds the weights from before that step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class NonFiniteGuard:
    """Before the update: a NaN or infinite loss or gradient norm raises NonFiniteError naming
    the step (the weights stay those from before it), or with `skip` drops the step's gradient
    and counts it in state.skipped_steps."""

    def __init__(self, skip: bool, say):
        self.skip, self.say = skip, say

    def update_allowed(self, loss: float, norm: float, optimizer, state) -> bool:
        if math.isfinite(loss) and math.isfinite(norm):
            return True
        what = f"the loss became {loss}" if not math.isfinite(loss) else f"the gradient norm became {norm}"
        optimizer.zero_grad()
        if not self.skip:
            raise NonFiniteError(f"{what} at step {state.step}, so training stopped there (the update "
                                 "was not applied); try a lower --lr, or --grad-clip 1.0, or "
                                 "--skip-nonfinite to skip such steps", state.step)
        state.skipped_steps += 1
        self.say(f"step {state.step}: {what}; step skipped ({state.skipped_steps} so far)")
        return False


# ---------------------------------------------------------------------------------------------
# Progress: the bar and the log
# ---------------------------------------------------------------------------------------------

class Progress:
    """A tqdm bar counting tokens (so its rate reads tokens/s; on stderr), and `say` for the
    loop's lines (above the bar, or plain prints). The time per step and tokens/s in each
    evaluation line cover the steps since the last one, evaluations and checkpoints not
    counted: they are not the training step's cost."""

    def __init__(self, enabled: bool, tokens_per_step: int, total_steps: int, done_steps: int, log=None):
        self.tokens_per_step = tokens_per_step
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm  # noqa: PLC0415 - only when a bar is wanted

            self.bar = tqdm(total=total_steps * tokens_per_step, initial=done_steps * tokens_per_step,
                            unit="tok", unit_scale=True, desc="train", dynamic_ncols=True, leave=False)
        self.say = log or (self.bar.write if self.bar is not None else functools.partial(print, flush=True))
        self.seconds, self.steps, self.tokens = 0.0, 0, 0
        self.ms = 0.0
        self._t = 0.0
        self._left, self._run_steps, self._run_tokens = total_steps - done_steps, 0, 0   # the bar's estimate

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def start_step(self) -> None:
        self._t = time.perf_counter()

    def end_step(self, epoch: int, loss: float, tokens: int | None = None) -> None:
        """A step is done: `tokens` it trained on (default: tokens_per_step, a full batch)."""
        tokens = self.tokens_per_step if tokens is None else tokens
        self.seconds += time.perf_counter() - self._t
        self.steps += 1
        self.tokens += tokens
        self.ms = 1000.0 * self.seconds / self.steps
        self._left -= 1
        self._run_steps += 1
        self._run_tokens += tokens
        if self.bar is not None:
            self.bar.update(tokens)
            if tokens != self.tokens_per_step:   # batches padded to their own length (fine-tuning):
                mean = self._run_tokens / self._run_steps   # the bar's total: the rest at the mean so far
                self.bar.total = self.bar.n + round(mean * max(self._left, 0))
            self.bar.set_postfix(ep=epoch + 1, loss=f"{loss:.3f}", ms_step=f"{self.ms:.0f}", refresh=False)

    def rate(self) -> str:
        """", 12.3 ms/step, 4,567 tokens/s" over the steps since the last call."""
        if not self.steps:
            return ""
        text = f", {self.ms:.1f} ms/step, {self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s"
        self.seconds, self.steps, self.tokens = 0.0, 0, 0
        return text


def tokens_in(batches) -> int:
    """Input tokens in a step's batches (the first array of each batch)."""
    return sum(int(np.prod(batch[0].shape)) for batch in batches)
