"""How well a model predicts some text: mean loss, perplexity and bits per byte.

    result = evaluate_text(model, tokenizer, text)
    result.loss             # mean -ln p(next token), in nats
    result.perplexity       # exp(loss): as unsure as a uniform choice among this many tokens
    result.bits_per_byte    # total nats / (ln 2 * UTF-8 bytes of the predicted text)

Every token but the first is predicted once: the ids are cut into windows of the model's
context length, each window predicting the tokens that follow its inputs (window k covers ids
kT .. kT+T and predicts kT+1 .. kT+T+1), so the first token of a window has only the window's
earlier tokens as context, as in training. Loss and perplexity depend on the tokenizer (a
character model predicts many more, easier tokens); bits per byte does not, so it compares a
char model with a BPE one on the same text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import minigrad as mg
from minigrad import backend

from .errors import GPT2Error


@dataclass(frozen=True)
class EvalResult:
    tokens: int        # tokens predicted
    nats: float        # their total -ln p
    bytes: int         # UTF-8 bytes of the predicted tokens' text
    @property
    def loss(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / (math.log(2) * self.bytes)


def token_nats(model, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-ln p(target) for every position of a batch (B, T) -> float64 (B, T), on the host."""
    with mg.no_grad():
        logits = model(inputs).data                                            # (B, T, V)
    out = np.empty(targets.shape, dtype=np.float64)
    for b in range(len(targets)):   # one row at a time in float64: (T, V) is 400 MB for GPT-2 at 1024
        z = backend.to_numpy(logits[b]).astype(np.float64)                     # (T, V)
        shift = z.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(z - shift).sum(axis=-1)) + shift[:, 0]           # (T,)
        out[b] = log_z - np.take_along_axis(z, targets[b][:, None], axis=-1)[:, 0]
    return out


def evaluate_ids(model, streams, n_bytes: int, batch_size: int = 4, names=None) -> EvalResult:
    """Evaluate `model` on token id arrays (`streams`: each one text, e.g. a shard), every token
    but each stream's first predicted; `n_bytes` is the UTF-8 size of the predicted text.
    `names` (one per stream) name a stream whose ids are outside the vocabulary."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise GPT2Error(f"batch size must be a positive integer, got {batch_size!r}")
    T = model.config.context_length
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for k, ids in enumerate(streams):
            ids = np.asarray(ids)
            if ids.size and int(ids.max()) >= model.config.vocab_size:
                where = names[k] if names is not None else "the text"
                raise GPT2Error(f"{where} holds token id {int(ids.max())}, outside the model's vocabulary of "
                                f"{model.config.vocab_size}")
            n = len(ids) - 1                                   # predictions in this stream
            full = n // T                                      # windows of exactly T predictions
            for b in range(0, full, batch_size):
                starts = np.arange(b, min(b + batch_size, full)) * T
                rows = ids[starts[:, None] + np.arange(T + 1)].astype(np.int64)
                total += float(token_nats(model, rows[:, :-1], rows[:, 1:]).sum())
            rest = ids[full * T:].astype(np.int64)            # the last, shorter window
            if len(rest) > 1:
                total += float(token_nats(model, rest[None, :-1], rest[None, 1:]).sum())
            count += max(n, 0)
    finally:
        model.train(was_training)
    if count == 0:
        raise GPT2Error("the text is a single token, so there is nothing to predict; give more text")
    return EvalResult(tokens=count, nats=total, bytes=n_bytes)


def utf8_bytes(tokenizer, ids) -> int:
    """UTF-8 bytes of the text of `ids`."""
    ids = np.asarray(ids).reshape(-1)
    if hasattr(tokenizer, "decode_bytes"):
        return len(tokenizer.decode_bytes(ids))
    return len(tokenizer.decode(ids).encode("utf-8"))


def evaluate_text(model, tokenizer, text: str, batch_size: int = 4) -> EvalResult:
    """Evaluate `model` on `text`, tokenized with `tokenizer` (the one the model was trained with)."""
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    return evaluate_ids(model, [ids], utf8_bytes(tokenizer, ids[1:]), batch_size)


def evaluate_dataset(model, dataset, split: str = "val", batch_size: int = 4) -> EvalResult:
    """Evaluate `model` on a split of a PreparedDataset (each shard a stream of its own)."""
    if split not in dataset.shards:
        raise GPT2Error(f"unknown split {split!r}; choose one of {', '.join(dataset.shards)}")
    shards = dataset.shards[split]
    if dataset.vocab_size != model.config.vocab_size:
        raise GPT2Error(f"{dataset.folder} has a vocabulary of {dataset.vocab_size:,} tokens and the model "
                        f"{model.config.vocab_size:,}; evaluate on data prepared with the model's tokenizer")
    names = [str(f) for f in dataset.shard_files(split)]
    for name, s in zip(names, shards):
        if s.size and int(s.max()) >= dataset.vocab_size:
            raise GPT2Error(f"{name} holds token id {int(s.max())}, beyond the dataset's vocabulary of "
                            f"{dataset.vocab_size} (damaged, or its manifest was edited); prepare it again")
    n_bytes = sum(utf8_bytes(dataset.tokenizer, s[1:]) for s in shards)
    return evaluate_ids(model, shards, n_bytes, batch_size, names)

