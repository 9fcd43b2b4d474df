"""Tokenizers: GPT-2's byte-pair encoding (through tiktoken) and a character-level one.

    tok = get_tokenizer()
    tok.encode("Hello, I am")        # [15496, 11, 314, 716]
    tok.decode([15496, 11, 314, 716])  # "Hello, I am"

    char = CharTokenizer.from_text("hello world")   # vocabulary: the sorted characters " dehlorw"
    char.encode("hello")             # [3, 2, 4, 4, 5]

Both share one small interface: `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`,
`name`, `eot_id` (None when there is no end-of-text token) and `to_dict()`; `tokenizer_from_dict`
rebuilds either from that JSON-able dict (a prepared dataset's manifest and a checkpoint's
tokenizer.json hold it), so a model always decodes with the tokenizer it was trained with.

BPE starts from the 256 bytes, so *any* text can be encoded (no unknown-word token); 50,000 merges
learned by OpenAI glue frequent byte pairs into longer tokens, and id 50256 is `<|endoftext|>`,
which separates documents. tiktoken downloads the two vocabulary files on first use and caches
them; offline, point `TIKTOKEN_CACHE_DIR` at a folder that already holds them.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from .errors import GPT2Error

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256


class Tokenizer:
    """A thin wrapper over a tiktoken encoding: text <-> lists of token ids."""

    def __init__(self, encoding):
        self._enc = encoding
        self.name = encoding.name
        self.n_vocab = encoding.n_vocab   # 50257 for gpt2
        self.eot_id = encoding.eot_token  # 50256

    @property
    def vocab_size(self) -> int:
        return self.n_vocab

    def to_dict(self) -> dict:
        return {"type": "gpt2"}

    def encode(self, text: str) -> list[int]:
        """Text -> ids. `<|endoftext|>` written in the text becomes its special id 50256."""
        return self._enc.encode(text, allowed_special={EOT_TOKEN})

    def decode(self, ids) -> str:
        """Ids (a list, or a 1-D array) -> text. Bytes that do not form valid UTF-8 become U+FFFD."""
        ids = np.asarray(ids).reshape(-1).tolist()
        return self._enc.decode(ids)

    def decode_bytes(self, ids) -> bytes:
        """Ids -> their raw bytes (a token may hold part of a multi-byte UTF-8 character)."""
        return self._enc.decode_bytes(np.asarray(ids).reshape(-1).tolist())

    def __repr__(self):
        return f"Tokenizer({self.name!r}, n_vocab={self.n_vocab})"


@functools.cache
def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    """The `gpt2` BPE tokenizer (cached: built once per process).

    Raises GPT2Error, in one line naming TIKTOKEN_CACHE_DIR, if the vocabulary can be neither
    read from the cache nor downloaded.
    """
    import tiktoken  # noqa: PLC0415 - keep `import gpt2` light

    try:
        return Tokenizer(tiktoken.get_encoding(name))
    except Exception as exc:  # no network, a proxy error, a corrupt cache, ...
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        where = os.environ.get("TIKTOKEN_CACHE_DIR")
        hint = (f"TIKTOKEN_CACHE_DIR={where} does not hold it" if where else "TIKTOKEN_CACHE_DIR is not set")
        raise GPT2Error(f"could not load the {name!r} tokenizer vocabulary (offline? {reason}); "
                        f"{hint}: set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached "
                        f"{name} files, or run once with network access") from None


class CharTokenizer:
    """One token per character: id i is the i-th character of the sorted vocabulary.

    nanoGPT's `shakespeare_char` tokenizer: Tiny Shakespeare has 65 distinct characters, so the
    model's embedding and output head have 65 rows instead of 50,257. Small vocabulary, long
    sequences: every character is a prediction, which makes it the classic small experiment.
    Encoding is one table lookup per character; a character outside the vocabulary has no id,
    so `encode` refuses it (naming it) instead of guessing.
    """

    name = "char"
    eot_id = None   # no end-of-text token: a character corpus is one stream

    def __init__(self, chars: str):
        if not isinstance(chars, str) or not chars:
            raise GPT2Error("a character vocabulary needs at least one character")
        if "".join(sorted(set(chars))) != chars:
            raise GPT2Error("a character vocabulary must list distinct characters in sorted order")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        # decode: ids index straight into this array of one-character strings
        self._itos = np.array(list(chars), dtype=object)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The vocabulary of `text`: its distinct characters, sorted by code point."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    n_vocab = vocab_size

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            missing = sorted(set(text) - set(self.stoi))
            shown = ", ".join(repr(c) for c in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise GPT2Error(f"the text has {len(missing)} character(s) outside this "
                            f"{len(self.chars)}-character vocabulary ({shown}); use only characters the "
                            "model was trained on") from None

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.chars)):
            raise GPT2Error(f"token id {int(ids.max() if ids.max() >= len(self.chars) else ids.min())} is "
                            f"outside the character vocabulary of {len(self.chars)}")
        return "".join(self._itos[ids].tolist())

    def to_dict(self) -> dict:
        return {"type": "char", "chars": self.chars}

    def __eq__(self, other):
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __hash__(self):
        return hash(self.chars)

    def __repr__(self):
        return f"CharTokenizer(vocab_size={len(self.chars)})"


TOKENIZERS = ("gpt2", "char")


def tokenizer_from_dict(d) -> Tokenizer | CharTokenizer:
    """Rebuild a tokenizer from its `to_dict()`; GPT2Error for anything else."""
    kind = d.get("type") if isinstance(d, dict) else None
    if kind == "gpt2":
        return get_tokenizer()
    if kind == "char":
        if not isinstance(d.get("chars"), str):
            raise GPT2Error("a char tokenizer record needs its characters as a string (\"chars\")")
        return CharTokenizer(d["chars"])
    raise GPT2Error(f"unknown tokenizer record {str(d)[:60]}; expected type gpt2 or char")


def encode(text: str) -> list[int]:
    return get_tokenizer().encode(text)


def decode(ids) -> str:
    return get_tokenizer().decode(ids)


def text_to_ids(text: str) -> np.ndarray:
    """Text -> a (1, T) int64 array, the batch of one that the model and `generate` take."""
    return np.asarray(encode(text), dtype=np.int64)[None, :]


def ids_to_text(ids) -> str:
    """(1, T) or (T,) ids -> text."""
    return decode(np.asarray(ids).reshape(-1))
