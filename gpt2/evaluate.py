"""Evaluation: the mean loss of a model over batches, and a sample of its text.

    calc_loss_batch(x, y, model)                 # one batch: a Tensor, for backward
    calc_loss_loader(val_loader, model, 5)       # the mean over the first 5 batches: a float
    evaluate_model(model, train_loader, val_loader, eval_iter=5)   # (train, val), dropout off

The book's functions of the same names (*LLMs from Scratch*, chapter 5). A loss function is any
`loss_fn(*batch, model) -> Tensor`, so fine-tuning evaluates with its own loss the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import minigrad as mg
from minigrad import functional as F

from .generate import generate


def calc_loss_batch(input_batch, target_batch, model) -> mg.Tensor:
    """Mean cross-entropy of the next-token predictions: logits (B, T, V) vs targets (B, T)."""
    logits = model(input_batch)
    return F.cross_entropy(logits, target_batch)


def calc_loss_loader(data_loader, model, num_batches: int | None = None, key: int = 0,
                     loss_fn=calc_loss_batch) -> float:
    """Mean batch loss over the first `num_batches` batches (all when None), as the book's.

    Uses `data_loader.batches()` when it has one, so evaluating a training loader does not move
    its position; any other iterable of batches works too. A loader of random windows
    (gpt2/dataset.py) gives `num_batches` fresh random batches instead, from a stream apart from
    training's, fixed by `key` (the step). No graph is built. Returns nan for an empty loader.
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
        for i, batch in enumerate(batches):
            if i >= n:
                break
            total += loss_fn(*batch, model).item()
    return total / n


def evaluate_model(model, train_loader, val_loader, eval_iter: int | None, key: int = 0,
                   loss_fn=calc_loss_batch) -> tuple[float, float]:
    """Train and validation loss with dropout off; the model goes back to training mode after.
    `key` picks the random evaluation batches of a prepared dataset (train passes the step)."""
    model.eval()
    try:
        train_loss = calc_loss_loader(train_loader, model, eval_iter, key, loss_fn)
        val_loss = calc_loss_loader(val_loader, model, eval_iter, key, loss_fn)
    finally:
        model.train()
    return train_loss, val_loss


@dataclass
class Evaluation:
    """One evaluation of a run, as gpt2.train.train records and prints it. An `eval_fn` that
    measures more than the loss (fine-tuning: a classifier's accuracy, DPO's rewards) returns
    the extra numbers in `metrics` (recorded in History.metrics) and what to print of them in
    `text` (appended to the log line after the losses, e.g. ", Train reward margin 0.015")."""
    train_loss: float
    val_loss: float
    metrics: dict = field(default_factory=dict)
    text: str = ""


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int = 50, **sampling) -> str:
    """Continue `prompt` (greedy unless sampling options are given); newlines shown as spaces."""
    ids = np.asarray(tokenizer.encode(prompt), dtype=np.int64)[None, :]
    out = generate(model, ids, max_new_tokens, **sampling)
    return tokenizer.decode(out[0]).replace("\n", " ")
