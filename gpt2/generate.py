"""Generating text: pick the next token from the model's logits, append it, repeat.

Choosing a token from the last position's logits z (V,):
  greedy (temperature 0):   argmax z
  temperature T > 0:        sample from softmax(z / T); T < 1 sharpens, T > 1 flattens
  top-k:                    first keep only the k largest logits
  top-p (nucleus):          keep the smallest set of most likely tokens whose probability adds up to p

The model runs on whichever backend it lives on; the choice of token is made on the host in
float64 with a NumPy generator, so a seed gives the same tokens on CPU and GPU.
"""

from __future__ import annotations

import codecs

import numpy as np

import minigrad as mg
from minigrad import backend

from .errors import GPT2Error


def check_sampling_args(max_new_tokens, temperature, top_k, top_p, names=None) -> None:
    """Reject nonsense sampling settings with a GPT2Error. `names` maps each argument to the name
    the message should use (the CLI passes its flags, e.g. {"top_p": "--top-p"})."""
    n = {"max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_k": "top_k",
         "top_p": "top_p", **(names or {})}
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise GPT2Error(f"{n['max_new_tokens']} must be an integer >= 0, got {max_new_tokens!r}")
    if temperature is None or not np.isfinite(temperature) or temperature < 0:
        raise GPT2Error(f"{n['temperature']} must be >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise GPT2Error(f"{n['top_k']} must be a positive integer, got {top_k!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise GPT2Error(f"{n['top_p']} must be in (0, 1], got {top_p!r}")


def next_token(logits: np.ndarray, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """Pick one token per row of `logits` (B, V) -> ids (B,)."""
    z = np.asarray(logits, dtype=np.float64)
    if temperature == 0.0:
        return z.argmax(axis=-1)
    z = z / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]   # the k-th largest per row
        z = np.where(z < kth, -np.inf, z)
    probs = np.exp(z - z.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        # Keep a token if the tokens more likely than it add up to less than p: the first token
        # is always kept, and the set stops as soon as it reaches p.
        keep_sorted = (np.cumsum(sorted_p, axis=-1) - sorted_p) < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    rng = rng or np.random.default_rng()
    u = rng.random((z.shape[0], 1))
    # Inverse-CDF sampling, all rows at once: the first index whose cumulative probability exceeds u.
    cdf = np.cumsum(probs, axis=-1)
    return np.minimum((cdf <= u).sum(axis=-1), z.shape[-1] - 1)


def generate(model, ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_id: int | None = None, seed: int | None = None,
             use_cache: bool = True) -> np.ndarray:
    """Extend `ids` (B, T) -- or (T,) -- by up to `max_new_tokens` tokens; returns (B, T + new).

    Greedy when temperature is 0, else sampling (with optional top-k and top-p). Only the last
    `context_length` tokens are fed to the model. Generation stops early once every row has
    produced `eos_id`: the eos that ends the last unfinished row is not appended (as in
    *LLMs from Scratch*), and rows that finished earlier are padded with `eos_id`.

    With `use_cache` (the default) the prompt is run once and each step feeds only the new token,
    reusing every layer's stored keys and values; the tokens are exactly those of recomputing
    the whole context (`use_cache=False`). Once the context is full, each step recomputes the
    cropped window, as the uncached path does.

    The tokens are those `generate_stream` yields one at a time, collected.
    """
    ids2d, squeeze = _as_batch(ids)
    new = list(generate_stream(model, ids2d, max_new_tokens, temperature, top_k, top_p, eos_id, seed,
                               use_cache))
    out = np.concatenate([ids2d, np.stack(new, axis=1)], axis=1) if new else ids2d
    return out[0] if squeeze else out


def generate_stream(model, ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, eos_id: int | None = None, seed: int | None = None,
                    use_cache: bool = True):
    """`generate`, one step at a time: yields each new token as soon as it is chosen -- an int for
    a prompt of shape (T,), an int64 array (B,) for a batch (B, T) -- so a caller can print it
    while the next one is computed. The same tokens as `generate` with the same arguments.

        for token in generate_stream(model, ids, 50):
            print(decoder.add(token), end="", flush=True)    # see TextStream
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    ids, squeeze = _as_batch(ids)
    ctx = model.config.context_length
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    done = np.zeros(ids.shape[0], dtype=bool)
    try:
        with mg.no_grad():
            cache = model.new_cache(ids.shape[0]) if use_cache else None
            logits = _forward_last(model, ids[:, -ctx:], cache)
            for step in range(max_new_tokens):
                nxt = next_token(logits, temperature, top_k, top_p, rng).astype(np.int64)
                if eos_id is not None:
                    nxt = np.where(done, eos_id, nxt)  # rows that already ended are padded
                    done |= nxt == eos_id
                    if done.all():
                        break  # the eos that ends the last row is not appended
                ids = np.concatenate([ids, nxt[:, None]], axis=1)
                yield int(nxt[0]) if squeeze else nxt
                if step == max_new_tokens - 1:
                    break  # no need to run the model for a token we will not pick
                if cache is not None and cache.length < ctx:
                    logits = _forward_last(model, ids[:, -1:], cache)
                else:
                    if cache is not None:
                        cache.reset()
                    logits = _forward_last(model, ids[:, -ctx:], cache)
    finally:
        model.train(was_training)


def _as_batch(ids) -> tuple[np.ndarray, bool]:
    """A prompt as int64 (B, T) on the host, and whether it was given as (T,)."""
    ids = np.asarray(backend.to_numpy(ids.data if isinstance(ids, mg.Tensor) else ids))
    squeeze = ids.ndim == 1
    if squeeze:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise GPT2Error(f"the prompt must have at least one token, got shape {ids.shape}")
    return ids.astype(np.int64), squeeze


class TextStream:
    """Token ids in, text out as soon as it is whole: `add(id)` returns the new text (maybe "")
    and `end()` whatever is left. A character that spans several tokens (GPT-2's BPE splits many
    multi-byte UTF-8 characters, e.g. emoji, across tokens) is held back until its last byte
    arrives, so a stream never prints half a character.

        stream = TextStream(tokenizer)
        for token in generate_stream(model, ids, 50):
            print(stream.add(token), end="", flush=True)
        print(stream.end())
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._shown = 0                                  # characters already returned
        self._bytes = getattr(tokenizer, "decode_bytes", None)
        if self._bytes is not None:
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        if self._bytes is not None:
            return self._utf8.decode(self._bytes([int(token)]))
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")   # a character still incomplete?
        new, self._shown = text[self._shown:], max(self._shown, len(text))
        return new

    def end(self) -> str:
        if self._bytes is not None:
            return self._utf8.decode(b"", final=True)
        text = self.tokenizer.decode(self.ids)
        new, self._shown = text[self._shown:], len(text)
        return new

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)


def _forward_last(model, ids: np.ndarray, cache) -> np.ndarray:
    """Logits of the last position, as a float64 host array (B, V). Only that position goes
    through the final layer norm and the output head."""
    logits = model(ids, cache, last_only=True)
    return backend.to_numpy(logits.data[:, -1, :]).astype(np.float64)
