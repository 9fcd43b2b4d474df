"""Training: the loop of *LLMs from Scratch*'s `train_model_simple`, with the extras a long run needs.

    optimizer = make_optimizer(model, lr=4e-4, weight_decay=0.1)
    history = train(model, train_loader, val_loader, optimizer, TrainConfig(epochs=10, eval_every=5))

Each step: forward a batch, cross-entropy against the shifted targets, backward, AdamW. Every
`eval_every` steps the mean loss over `eval_iter` batches of each loader is printed,

    Ep 1 (Step 000000): Train loss 9.781, Val loss 9.933, Tokens seen 512

and after every epoch the model continues a prompt ("Every effort moves you") greedily, so the
reader can watch it go from gibberish to (memorised) Wharton.

`train()` is that loop. The extras it names (gradient accumulation, the learning-rate schedule,
data parallelism and clipping, the NaN guard, the progress bar) live in gpt2/train_extras.py;
with TrainConfig's defaults each does nothing. Whoever calls train() plugs in the rest: `hooks`
run after every step (the CLI saves checkpoints and answers Ctrl-C there), `loss_fn` replaces
the language-model loss and `eval_fn` the evaluation (fine-tuning: gpt2/finetune), `comm`
makes it data parallel.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np

from minigrad.optim import AdamW

from . import evaluate
from .errors import GPT2Error
from .evaluate import Evaluation, evaluate_model, sample_text
from .train_extras import (
    NonFiniteError,
    NonFiniteGuard,
    Progress,
    Ranks,
    accumulate_gradients,
    lr_schedule,
    steps_of,
    steps_per_epoch,
    tokens_in,
)

__all__ = ["History", "NonFiniteError", "TrainConfig", "TrainState", "make_optimizer", "total_steps", "train"]


def train(model, train_loader, val_loader, optimizer, config: TrainConfig | None = None, *,
          tokenizer=None, state: TrainState | None = None, history: History | None = None,
          loss_fn=None, eval_fn=None, comm=None, hooks=(), log=None, **overrides) -> History:
    """Train `model` in place and return the History of its evaluations.

    `config` fields may also be given as keyword arguments (`train(..., epochs=2)`). To continue
    a run, pass its `state` and `history` and a loader whose position was restored
    (gpt2/resume.py). Each of `hooks` is called as hook(state) after every step; one returning
    True ends training there, with every state consistent for a checkpoint. `log` prints a line
    (default: above the progress bar). `loss_fn(*batch, model)` gives a batch's loss (default:
    evaluate.calc_loss_batch, the next-token cross-entropy). `eval_fn(model, train_loader,
    val_loader, eval_iter, key)` -> evaluate.Evaluation replaces the evaluation (default: the
    mean loss_fn of eval_iter batches of each loader), to measure more than the loss; it leaves
    the model in training mode. `comm`: data parallel, every rank calling train() (see
    train_extras.Ranks).
    """
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    loss_fn = loss_fn if loss_fn is not None else evaluate.calc_loss_batch
    state = state if state is not None else TrainState(epoch=train_loader.epoch)
    history = history if history is not None else History()
    ranks = Ranks(model, optimizer, comm)
    _check_fits(model, train_loader, cfg, ranks)
    n_steps = total_steps(train_loader, cfg)
    schedule = lr_schedule(optimizer, cfg.warmup_steps, cfg.min_lr, n_steps)
    tokens_per_step = train_loader.tokens_per_batch * cfg.grad_accum
    progress = Progress(cfg.progress, tokens_per_step, n_steps, state.step, log)
    guard = NonFiniteGuard(cfg.skip_nonfinite, progress.say)
    t0 = time.perf_counter()
    model.train()
    try:
        with progress:
            for epoch in range(train_loader.epoch, cfg.epochs):
                if _reached_max_steps(state, cfg):
                    break
                for batches, position in steps_of(train_loader, cfg.grad_accum):
                    progress.start_step()
                    if schedule is not None:
                        optimizer.set_lr(schedule(state.step))
                    optimizer.zero_grad()
                    loss = accumulate_gradients(model, ranks.own_rows(batches), loss_fn)  # forward, backward
                    loss, norm = ranks.average(loss, cfg.grad_clip)   # over the ranks; clipped
                    if guard.update_allowed(loss, norm, optimizer, state):
                        optimizer.step()
                    step = state.step                 # 0-based index of this step, as the book prints
                    state.step += 1
                    tokens = tokens_in(batches)       # (fine-tuning's padded batches vary in length)
                    state.tokens_seen += tokens
                    progress.end_step(epoch, loss, tokens)
                    if step % cfg.eval_every == 0 or (cfg.eval_final and state.step == n_steps):
                        _evaluate(model, train_loader, val_loader, optimizer, cfg, state, history,
                                  step, epoch, position, progress, loss_fn, eval_fn)
                    state.epoch = train_loader.epoch  # epochs completed (the loader moved on)
                    if any([hook(state) for hook in hooks]):   # every hook runs, then maybe stop
                        return history
                    if _reached_max_steps(state, cfg):
                        break
                if tokenizer is not None and cfg.sample_prompt:   # after every epoch, and at the end
                    text = sample_text(model, tokenizer, cfg.sample_prompt, cfg.sample_tokens)
                    history.samples.append(text)
                    progress.say(text)
    finally:
        history.seconds += time.perf_counter() - t0
    return history


def _evaluate(model, train_loader, val_loader, optimizer, cfg, state, history, step, epoch, position,
              progress, loss_fn, eval_fn) -> None:
    """Train and validation loss (prepared datasets: random batches picked by the step), and
    whatever else `eval_fn` measures, recorded in the history and printed as the book does."""
    if eval_fn is None:
        ev = Evaluation(*evaluate_model(model, train_loader, val_loader, cfg.eval_iter, key=step,
                                        loss_fn=loss_fn))
    else:
        ev = eval_fn(model, train_loader, val_loader, cfg.eval_iter, key=step)
    history.record(step, epoch + position, state.tokens_seen, ev.train_loss, ev.val_loss,
                   optimizer.param_groups[0]["lr"], ev.metrics)
    progress.say(f"Ep {epoch + 1} (Step {step:06d}): Train loss {ev.train_loss:.3f}, Val loss "
                 f"{ev.val_loss:.3f}{ev.text}, Tokens seen {state.tokens_seen:,}{progress.rate()}")


def _reached_max_steps(state, cfg) -> bool:
    return cfg.max_steps is not None and state.step >= cfg.max_steps


def _check_fits(model, train_loader, cfg, ranks) -> None:
    window, ctx = train_loader.dataset.max_length, model.config.context_length
    if window > ctx:
        raise GPT2Error(f"the training windows are {window} tokens long, more than the model's context "
                        f"length {ctx}; use windows of at most {ctx} tokens")
    ranks.check_batch(train_loader.batch_size)
    if steps_per_epoch(train_loader, cfg.grad_accum) == 0:
        raise GPT2Error(f"an epoch has {len(train_loader)} batches, fewer than --grad-accum "
                        f"{cfg.grad_accum}; use a smaller --grad-accum or --batch-size, or more data")


def total_steps(train_loader, cfg: TrainConfig) -> int:
    """The optimizer steps of the whole run: --epochs of them, or --max-steps if fewer."""
    n = cfg.epochs * steps_per_epoch(train_loader, cfg.grad_accum)
    return n if cfg.max_steps is None else min(n, cfg.max_steps)


# ---------------------------------------------------------------------------------------------
# What a run is told, where it is, and what it printed
# ---------------------------------------------------------------------------------------------

def _positive_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


@dataclass
class TrainConfig:
    epochs: int = 10                   # passes over the training loader
    max_steps: int | None = None       # stop after this many optimizer steps in total (None: no limit)
    eval_every: int = 5                # evaluate every N steps (the book's eval_freq)
    eval_iter: int = 5                 # batches per loader in each evaluation (None: all of them)
    grad_clip: float | None = None     # clip the global gradient norm to this (None: no clipping)
    warmup_steps: int | None = None    # None: constant lr (the book); else linear warmup + cosine decay
    min_lr: float | None = None        # where the cosine ends (None: lr / 10)
    grad_accum: int = 1                # batches whose gradients are summed into one optimizer step
    eval_final: bool = False           # also evaluate after the last step (if it was not an eval step)
    sample_prompt: str | None = "Every effort moves you"   # continued after each epoch (None: off)
    sample_tokens: int = 50            # tokens generated for that sample (greedy, as the book)
    progress: bool = True              # tqdm bar with tokens/s (on stderr)
    skip_nonfinite: bool = False       # a NaN/inf loss or gradient: skip that step (else: stop)

    def __post_init__(self):
        for name in ("epochs", "max_steps", "eval_every", "eval_iter", "sample_tokens", "grad_accum"):
            v = getattr(self, name)
            if not (_positive_int(v) or (v is None and name in ("max_steps", "eval_iter"))):
                raise GPT2Error(f"{name} must be a positive integer, got {v!r}")
        if self.min_lr is not None and not (isinstance(self.min_lr, (int, float)) and self.min_lr >= 0):
            raise GPT2Error(f"min_lr must be a number >= 0, got {self.min_lr!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise GPT2Error(f"grad_clip must be > 0, got {self.grad_clip!r}")
        w = self.warmup_steps
        if w is not None and (not isinstance(w, (int, np.integer)) or isinstance(w, bool) or w < 0):
            raise GPT2Error(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")


@dataclass
class TrainState:
    """Where a run is: enough, with the loader's and the generator's state, to resume it."""
    step: int = 0           # optimizer steps taken
    epoch: int = 0          # epochs completed
    tokens_seen: int = 0    # input tokens the model has been trained on
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient (skip_nonfinite)

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        """From a saved trainer state; ValueError names a field that is not an integer >= 0."""
        values = {f.name: d.get(f.name, 0) for f in dataclasses.fields(cls)}
        for name, v in values.items():
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise ValueError(f"{name} must be an integer >= 0, got {str(v)[:40]}")
        return cls(**values)


@dataclass
class History:
    """What the run printed, as lists (one entry per evaluation), for plotting and for JSON."""
    steps: list = field(default_factory=list)         # global step (0-based) of each evaluation
    epochs: list = field(default_factory=list)        # fractional epochs done at each evaluation
    tokens_seen: list = field(default_factory=list)
    train_losses: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    metrics: list = field(default_factory=list)       # each evaluation's further numbers ({} if none)
    samples: list = field(default_factory=list)       # one generated text per epoch
    seconds: float = 0.0                              # wall time spent in train()

    def record(self, step, epochs, tokens_seen, train_loss, val_loss, lr, metrics=None) -> None:
        for name, value in zip(("steps", "epochs", "tokens_seen", "train_losses", "val_losses", "lrs"),
                               (step, epochs, tokens_seen, train_loss, val_loss, lr)):
            getattr(self, name).append(value)
        self.metrics.append(dict(metrics or {}))

    def metric(self, name: str) -> list:
        """One of the further numbers at every evaluation (None where it was not measured)."""
        return [m.get(name) for m in self.metrics]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> History:
        """From a saved history; ValueError names a field of the wrong kind."""
        known = {f.name for f in dataclasses.fields(cls)}
        h = cls(**{k: v for k, v in d.items() if k in known}) if isinstance(d, dict) else None
        if h is None:
            raise ValueError("history must be a JSON object")
        for name in ("steps", "epochs", "tokens_seen", "train_losses", "val_losses", "lrs"):
            v = getattr(h, name)
            if not (isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                for x in v)):
                raise ValueError(f"history.{name} must be a list of numbers")
        if not (isinstance(h.metrics, list) and all(
                isinstance(m, dict) and all(isinstance(k, str) and isinstance(x, (int, float))
                                            and not isinstance(x, bool) for k, x in m.items())
                for m in h.metrics) and len(h.metrics) <= len(h.steps)):
            raise ValueError("history.metrics must be a list of {name: number} objects, one per evaluation")
        h.metrics = [{}] * (len(h.steps) - len(h.metrics)) + h.metrics   # (saved before it existed)
        if not (isinstance(h.samples, list) and all(isinstance(x, str) for x in h.samples)):
            raise ValueError("history.samples must be a list of strings")
        if not (isinstance(h.seconds, (int, float)) and not isinstance(h.seconds, bool)
                and math.isfinite(h.seconds)):
            raise ValueError("history.seconds must be a number")
        return h


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
