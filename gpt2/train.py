"""Training: the loop of *LLMs from Scratch*'s `train_model_simple`, plus a few optional extras.

    optimizer = make_optimizer(model, lr=4e-4, weight_decay=0.1)
    history = train(model, train_loader, val_loader, optimizer, TrainConfig(epochs=10, eval_every=5))

Each step: forward a batch, cross-entropy against the shifted targets, backward, (clip), AdamW.
Every `eval_every` steps the mean loss over `eval_iter` batches of the training and validation
loaders is printed:

    Ep 1 (Step 000000): Train loss 9.781, Val loss 9.933, Tokens seen 512

and after every epoch the model continues a prompt ("Every effort moves you") greedily, so the
reader can watch it go from gibberish to (memorised) Wharton.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

import minigrad as mg
from minigrad import backend, distributed, nn
from minigrad import functional as F
from minigrad.optim import AdamW, WarmupCosine, clip_grad_norm_

from .errors import GPT2Error
from .generate import generate


@dataclass
class TrainConfig:
    epochs: int = 10                   # passes over the training loader
    max_steps: int | None = None       # stop after this many optimizer steps in total (None: no limit)
    eval_every: int = 5                # evaluate every N steps (the book's eval_freq)
    eval_iter: int = 5                 # batches per loader in each evaluation (None: all of them)
    grad_clip: float | None = None     # clip the global gradient norm to this (None: no clipping)
    warmup_steps: int | None = None    # None: constant lr (the book); else linear warmup + cosine decay
    min_lr_ratio: float = 0.1          # the cosine schedule ends at lr * min_lr_ratio ...
    min_lr: float | None = None        # ... or at this learning rate, when given
    grad_accum: int = 1                # batches whose gradients are summed into one optimizer step
    eval_final: bool = False           # also evaluate after the last step (if it was not an eval step)
    sample_prompt: str | None = "Every effort moves you"   # continued after each epoch (None: off)
    sample_tokens: int = 50            # tokens generated for that sample (greedy, as the book)
    progress: bool = True              # tqdm bar with tokens/s (on stderr)
    skip_nonfinite: bool = False       # a NaN/inf loss or gradient: skip that step (else: stop)

    def __post_init__(self):
        def positive(name, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise GPT2Error(f"{name} must be a positive integer, got {v!r}")
        positive("epochs")
        positive("max_steps", allow_none=True)
        positive("eval_every")
        positive("eval_iter", allow_none=True)
        positive("sample_tokens")
        positive("grad_accum")
        if self.min_lr is not None and not (isinstance(self.min_lr, (int, float)) and self.min_lr >= 0):
            raise GPT2Error(f"min_lr must be a number >= 0, got {self.min_lr!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise GPT2Error(f"grad_clip must be > 0, got {self.grad_clip!r}")
        w = self.warmup_steps
        if w is not None and (not isinstance(w, (int, np.integer)) or w < 0):
            raise GPT2Error(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")


@dataclass
class TrainState:
    """Where a run is: enough, with the loader's and the generator's state, to resume it."""
    step: int = 0           # optimizer steps taken
    epoch: int = 0          # epochs completed
    tokens_seen: int = 0    # input tokens the model has been trained on
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient (skip_nonfinite)


class NonFiniteError(GPT2Error):
    """The loss or the gradient became NaN or infinite at `step`; the update was not applied, so
    the model still holds the weights from before that step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclass
class History:
    """What the run printed, as lists (one entry per evaluation), for plotting and for JSON."""
    steps: list = field(default_factory=list)         # global step (0-based) of each evaluation
    epochs: list = field(default_factory=list)        # fractional epochs done at each evaluation
    tokens_seen: list = field(default_factory=list)
    train_losses: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    samples: list = field(default_factory=list)       # one generated text per epoch
    seconds: float = 0.0                              # wall time spent in train()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> History:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

def calc_loss_batch(input_batch, target_batch, model) -> mg.Tensor:
    """Mean cross-entropy of the next-token predictions: logits (B, T, V) vs targets (B, T)."""
    logits = model(input_batch)
    return F.cross_entropy(logits, target_batch)


def calc_loss_loader(data_loader, model, num_batches: int | None = None, key: int = 0) -> float:
    """Mean batch loss over the first `num_batches` batches (all when None), as the book's.

    Uses `data_loader.batches()` when it has one, so evaluating a training loader does not move
    its position; any other iterable of (inputs, targets) works too. A loader of random windows
    (gpt2/dataset.py) gives `num_batches` fresh random batches instead, fixed by `key` (the step).
    No graph is built. Returns nan for an empty loader.
    """
    n = len(data_loader)
    if n == 0:
        return float("nan")
    if hasattr(data_loader, "eval_batches"):
        n = n if num_batches is None else num_batches
        batches = data_loader.eval_batches(n, key)
    else:
        n = n if num_batches is None else min(num_batches, n)
        batches = data_loader.batches() if hasattr(data_loader, "batches") else iter(data_loader)
    total = 0.0
    with mg.no_grad():
        for i, (x, y) in enumerate(batches):
            if i >= n:
                break
            total += calc_loss_batch(x, y, model).item()
    return total / n


def evaluate_model(model, train_loader, val_loader, eval_iter: int | None,
                   key: int = 0) -> tuple[float, float]:
    """Train and validation loss with dropout off; the model goes back to training mode after.
    `key` picks the random evaluation batches of a prepared dataset (train passes the step)."""
    model.eval()
    try:
        train_loss = calc_loss_loader(train_loader, model, eval_iter, key)
        val_loss = calc_loss_loader(val_loader, model, eval_iter, key)
    finally:
        model.train()
    return train_loss, val_loss


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int = 50, **sampling) -> str:
    """Continue `prompt` (greedy unless sampling options are given); newlines shown as spaces."""
    ids = np.asarray(tokenizer.encode(prompt), dtype=np.int64)[None, :]
    out = generate(model, ids, max_new_tokens, **sampling)
    return tokenizer.decode(out[0]).replace("\n", " ")


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------

INITS = ("book", "gpt2")


def pytorch_default_init_(model) -> None:
    """Re-draw every parameter as PyTorch's default layers would, in place: *LLMs from Scratch*'s
    GPTModel has no init of its own, so this is the book's starting point.

        Linear weight and bias   uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))
        Embedding                normal(0, 1)
        LayerNorm                scale 1, shift 0

    Why the course run uses it rather than GPT-2's normal(0, 0.02) (GPTModel's default): the
    course trains 90 steps at a constant lr of 4e-4 with an untied head. From GPT-2's tiny
    embeddings that run stalls at a loss of about 6, predicting only frequent tokens; from
    unit-variance embeddings it memorises the story (train loss < 1) as the book shows.
    PyTorch from the same weights on the same batches, dropout off, gives the same losses to
    within 1e-5 over 30 steps (`benchmarks/same_run.py`). GPT-2's init is the
    better default for long runs with warmup (nanoGPT's recipe), and the one to use with a tied
    head (unit-variance embeddings as output weights give huge initial logits).

    Draws from minigrad's seeded generator, so `mg.manual_seed` makes it reproducible.
    """
    rng = backend.rng()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.weight.shape[1])
            for p in (m.weight, m.bias):
                if p is not None:
                    p.data = ((rng.random(p.shape) * 2.0 - 1.0) * bound).astype(p.dtype, copy=False)
        elif isinstance(m, nn.Embedding):
            m.weight.data = rng.normal(m.weight.shape, std=1.0, dtype=m.weight.dtype)
        elif isinstance(m, nn.LayerNorm):
            m.weight.data = backend.xp.ones(m.weight.shape, dtype=m.weight.dtype)
            if m.bias is not None:
                m.bias.data = backend.xp.zeros(m.bias.shape, dtype=m.bias.dtype)


def init_model_(model, init: str) -> None:
    """Apply a named initialisation: "gpt2" (GPTModel's own, nothing to do) or "book"."""
    if init == "book":
        pytorch_default_init_(model)
    elif init != "gpt2":
        raise GPT2Error(f"unknown init {init!r}; choose one of {', '.join(INITS)}")


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------

def make_optimizer(model, lr: float = 4e-4, weight_decay: float = 0.1, decay_all: bool = True,
                   betas=(0.9, 0.999), eps: float = 1e-8) -> AdamW:
    """AdamW over the model's parameters.

    `decay_all=True` (default) is the book's `torch.optim.AdamW(model.parameters(), lr=4e-4,
    weight_decay=0.1)`: every parameter decays, biases and LayerNorm scales included.
    `decay_all=False` is GPT-2/nanoGPT's practice: only matrices (embeddings, linear weights)
    decay; biases and LayerNorm parameters are not pulled towards zero, since they set offsets
    and scales rather than store patterns.
    """
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise GPT2Error(f"learning rate must be a positive number, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise GPT2Error(f"weight decay must be >= 0, got {weight_decay!r}")
    params = model.parameters()
    if not decay_all:
        params = [{"params": [p for p in params if p.ndim >= 2]},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def grad_norm(params) -> float:
    """The global L2 norm of the gradients (inf or nan if any gradient is not finite), summed on
    the device with one transfer to the host."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    xp = mg.backend.xp
    total = float(sum(xp.vdot(g.ravel(), g.ravel()) for g in grads))
    return math.sqrt(total) if total >= 0 else total   # nan stays nan


def steps_per_epoch(train_loader, cfg: TrainConfig) -> int:
    """Optimizer steps per epoch: each takes `grad_accum` batches (an epoch's leftover batches,
    fewer than grad_accum, are skipped, as drop_last skips a short batch)."""
    return len(train_loader) // cfg.grad_accum


def reduce_gradients(model, optimizer, bucket, grad_clip: float | None) -> float:
    """Data parallelism's one extra step, between backward and the update: average the
    gradients over the ranks, then clip; returns the global gradient norm (the same on every
    rank). ZeRO-1 (an optimizer with `reduce_gradients`) keeps only its shard of the average;
    otherwise `bucket` all-reduces them (None: one rank, nothing to average)."""
    if hasattr(optimizer, "reduce_gradients"):
        optimizer.reduce_gradients()
        return optimizer.clip_grad_norm_(grad_clip) if grad_clip is not None else optimizer.grad_norm()
    if bucket is not None:
        bucket.average_()
    if grad_clip is not None:
        return clip_grad_norm_(model.parameters(), grad_clip)
    return grad_norm(model.parameters())


def rank_slice(x, y, comm):
    """This rank's rows of a global batch: rank r of N takes rows [r B, (r+1) B), B = rows / N."""
    if comm.world_size == 1:
        return x, y
    b = len(x) // comm.world_size
    return x[comm.rank * b:(comm.rank + 1) * b], y[comm.rank * b:(comm.rank + 1) * b]


def total_steps(train_loader, cfg: TrainConfig) -> int:
    n = cfg.epochs * steps_per_epoch(train_loader, cfg)
    return n if cfg.max_steps is None else min(n, cfg.max_steps)


def accumulate_gradients(model, batches) -> float:
    """Forward and backward every (inputs, targets) batch, leaving the summed gradient in p.grad;
    returns the mean loss.

    Gradient accumulation: with N batches of B windows, loss_k / N summed over k is the mean
    cross-entropy over all N*B*T predictions -- the loss of one batch of N*B windows -- and since
    gradients add (backward accumulates into p.grad), N backward passes of loss_k / N leave
    exactly that batch's gradient, using the memory of one small batch. One batch (N = 1) is the
    plain step, with no scaling at all.
    """
    n = len(batches)
    total = 0.0
    for x, y in batches:
        loss = calc_loss_batch(x, y, model)   # forward: logits (B, T, V) -> scalar
        if n > 1:
            loss = loss * (1.0 / n)
        loss.backward()                       # adds into p.grad for every parameter
        total += loss.item()
    return total


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def train(model, train_loader, val_loader, optimizer, config: TrainConfig | None = None, *,
          tokenizer=None, state: TrainState | None = None, history: History | None = None,
          on_step: Callable[[TrainState], None] | None = None, log: Callable[[str], None] | None = None,
          stop: Callable[[], bool] | None = None, comm=None, **overrides) -> History:
    """Train `model` in place and return the History of evaluations.

    `config` fields may also be given as keyword arguments (`train(..., epochs=2)`). To continue a
    run, pass its `state` and `history` (and a loader whose state was restored): epochs resume at
    `train_loader.epoch`, steps and tokens from `state`. `on_step(state)` is called after every
    optimizer step (e.g. to save checkpoints); `log` prints a line (default: above the progress bar).
    `stop()` is asked after every step (and its on_step); True ends training there, before the
    end-of-epoch sample, with every state consistent for a checkpoint (Ctrl-C in the CLI).

    A NaN or infinite loss or gradient raises NonFiniteError naming the step, before the update
    is applied; with `skip_nonfinite` the step is skipped instead (counted in state.skipped_steps).

    Data parallelism: with `comm` (a `minigrad.distributed` communicator of N ranks, every rank
    calling train() with the same model, optimizer and loader), each loader batch is the *global*
    batch: rank r trains on its rows, the gradients are averaged over the ranks before clipping,
    and the loss and NaN guard use the average over the ranks, so every rank takes the same step.
    `stop()` must then answer the same on every rank (the CLI agrees it across ranks).
    """
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    window, ctx = train_loader.dataset.max_length, model.config.context_length
    if window > ctx:
        raise GPT2Error(f"the training windows are {window} tokens long, more than the model's context "
                        f"length {ctx}; use windows of at most {ctx} tokens")
    comm = comm if comm is not None else distributed.SingleProcess()
    if train_loader.batch_size % comm.world_size:
        raise GPT2Error(f"the loader's batch of {train_loader.batch_size} windows does not split evenly over "
                        f"{comm.world_size} ranks; give it a batch of ranks x per-rank batch")
    bucket = distributed.GradientBucket(model.parameters(), comm) if comm.world_size > 1 else None
    state = state if state is not None else TrainState(epoch=train_loader.epoch)
    history = history if history is not None else History()
    n_total = total_steps(train_loader, cfg)
    if steps_per_epoch(train_loader, cfg) == 0:
        raise GPT2Error(f"an epoch has {len(train_loader)} batches, fewer than --grad-accum "
                        f"{cfg.grad_accum}; "
                        "use a smaller --grad-accum or --batch-size, or more data")
    schedule = None
    if cfg.warmup_steps is not None:
        # The peak lr is the optimizer's lr when training first started (kept in its state, so a
        # resumed run rebuilds the same schedule even though "lr" has moved on since).
        lr = optimizer.param_groups[0].setdefault("initial_lr", optimizer.param_groups[0]["lr"])
        schedule = WarmupCosine(max_lr=lr, warmup_steps=cfg.warmup_steps, total_steps=n_total,
                                min_lr=lr * cfg.min_lr_ratio if cfg.min_lr is None else cfg.min_lr)

    tokens_per_step = train_loader.tokens_per_batch * cfg.grad_accum
    bar = _progress(cfg.progress, total=n_total * tokens_per_step, initial=state.step * tokens_per_step)
    say = log or (bar.write if bar is not None else functools.partial(print, flush=True))
    timer = _StepTimer()
    t0 = time.perf_counter()
    model.train()
    done = cfg.max_steps is not None and state.step >= cfg.max_steps   # a resumed run that is done
    try:
        for epoch in range(train_loader.epoch, cfg.epochs if not done else 0):
            first = train_loader.batch_index        # > 0 only when resuming mid-epoch
            micro = []                              # the batches of the step being gathered
            for i, (x, y) in enumerate(train_loader):
                micro.append((x, y))
                if len(micro) < cfg.grad_accum:
                    continue
                t_step = time.perf_counter()
                if schedule is not None:
                    optimizer.set_lr(schedule(state.step))
                optimizer.zero_grad()
                loss_value = accumulate_gradients(   # p.grad: this rank's gradient of the step
                    model, [rank_slice(xb, yb, comm) for xb, yb in micro])
                norm = reduce_gradients(model, optimizer, bucket, cfg.grad_clip)   # averaged over ranks
                if comm.world_size > 1:               # the global batch's loss, on every rank
                    loss_value = float(comm.all_reduce_scalars([loss_value])[0]) / comm.world_size
                finite = math.isfinite(loss_value) and math.isfinite(norm)
                if not finite:
                    what = (f"the loss became {loss_value}" if not math.isfinite(loss_value)
                            else f"the gradient norm became {norm}")
                    if not cfg.skip_nonfinite:
                        optimizer.zero_grad()
                        raise NonFiniteError(f"{what} at step {state.step}, so training stopped there "
                                             "(the update was not applied); try a lower --lr, or "
                                             "--grad-clip 1.0, or --skip-nonfinite to skip such steps",
                                             state.step)
                    state.skipped_steps += 1
                    say(f"step {state.step}: {what}; step skipped ({state.skipped_steps} so far)")
                    optimizer.zero_grad()
                else:
                    optimizer.step()
                state.tokens_seen += sum(int(np.prod(xb.shape)) for xb, _ in micro)
                micro = []
                step = state.step                     # 0-based index of this step, as the book prints
                state.step += 1
                timer.add(time.perf_counter() - t_step, tokens_per_step)
                if bar is not None:
                    bar.update(tokens_per_step)
                    bar.set_postfix(ep=epoch + 1, loss=f"{loss_value:.3f}", ms_step=f"{timer.ms:.0f}",
                                    refresh=False)
                if step % cfg.eval_every == 0 or (cfg.eval_final and state.step == n_total):
                    train_loss, val_loss = evaluate_model(model, train_loader, val_loader, cfg.eval_iter,
                                                          key=step)
                    history.steps.append(step)
                    history.epochs.append(epoch + (first + i + 1) / len(train_loader))
                    history.tokens_seen.append(state.tokens_seen)
                    history.train_losses.append(train_loss)
                    history.val_losses.append(val_loss)
                    history.lrs.append(optimizer.param_groups[0]["lr"])
                    say(f"Ep {epoch + 1} (Step {step:06d}): Train loss {train_loss:.3f}, "
                        f"Val loss {val_loss:.3f}, Tokens seen {state.tokens_seen:,}{timer.report()}")
                state.epoch = train_loader.epoch      # epochs completed (the loader moved on)
                if on_step is not None:
                    on_step(state)
                if stop is not None and stop():
                    return history                    # (the finally below still runs)
                if cfg.max_steps is not None and state.step >= cfg.max_steps:
                    done = True
                    break
            if tokenizer is not None and cfg.sample_prompt:   # after every epoch, and at the end
                text = sample_text(model, tokenizer, cfg.sample_prompt, cfg.sample_tokens)
                history.samples.append(text)
                say(text)
            if done:
                break
    finally:
        if bar is not None:
            bar.close()
        history.seconds += time.perf_counter() - t0
    return history


class _StepTimer:
    """Time per optimizer step and tokens/s over the steps since the last report (evaluations
    and checkpoint saves not counted: they are not the training step's cost)."""

    def __init__(self):
        self.seconds, self.steps, self.tokens, self.ms = 0.0, 0, 0, 0.0

    def add(self, seconds: float, tokens: int) -> None:
        self.seconds += seconds
        self.steps += 1
        self.tokens += tokens
        self.ms = 1000.0 * self.seconds / self.steps

    def report(self) -> str:
        if not self.steps:
            return ""
        text = f", {self.ms:.1f} ms/step, {self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s"
        self.seconds, self.steps, self.tokens = 0.0, 0, 0
        return text


def _progress(enabled: bool, total: int, initial: int):
    """A tqdm bar counting tokens, so its rate reads tokens/s."""
    if not enabled:
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc="train",
                dynamic_ncols=True, leave=False)
