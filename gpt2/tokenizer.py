"""The tokenizer: GPT-2's byte-pair encoding, through tiktoken's `gpt2` encoding.

    tok = get_tokenizer()
    tok.encode("Hello, I am")        # [15496, 11, 314, 716]
    tok.decode([15496, 11, 314, 716])  # "Hello, I am"

BPE starts from the 256 bytes, so *any* text can be encoded (no unknown-word token); 50,000 merges
learned by OpenAI glue frequent byte pairs into longer tokens, and id 50256 is `<|endoftext|>`,
which separates documents. tiktoken downloads the two vocabulary files on first use and caches
them; offline, point `TIKTOKEN_CACHE_DIR` at a folder that already holds them.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from .errors import GPT2Error

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256

# Beside a development checkout there may be a `shared/` folder with tiktoken's cache files
# (the project's CI material). When TIKTOKEN_CACHE_DIR is unset we use it, so the course and the
# tests run offline there; anywhere else this path simply does not exist.
_SHARED_CACHE = Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"


class Tokenizer:
    """A thin wrapper over a tiktoken encoding: text <-> lists of token ids."""

    def __init__(self, encoding):
        self._enc = encoding
        self.name = encoding.name
        self.n_vocab = encoding.n_vocab   # 50257 for gpt2
        self.eot_id = encoding.eot_token  # 50256

    def encode(self, text: str) -> list[int]:
        """Text -> ids. `<|endoftext|>` written in the text becomes its special id 50256."""
        return self._enc.encode(text, allowed_special={EOT_TOKEN})

    def decode(self, ids) -> str:
        """Ids (a list, or a 1-D array) -> text. Bytes that do not form valid UTF-8 become U+FFFD."""
        ids = np.asarray(ids).reshape(-1).tolist()
        return self._enc.decode(ids)

    def __repr__(self):
        return f"Tokenizer({self.name!r}, n_vocab={self.n_vocab})"


@functools.cache
def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    """The `gpt2` BPE tokenizer (cached: built once per process).

    Raises GPT2Error, in one line naming TIKTOKEN_CACHE_DIR, if the vocabulary can be neither
    read from the cache nor downloaded.
    """
    import tiktoken  # noqa: PLC0415 - keep `import gpt2` light

    if "TIKTOKEN_CACHE_DIR" not in os.environ and _SHARED_CACHE.is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(_SHARED_CACHE)
    try:
        return Tokenizer(tiktoken.get_encoding(name))
    except Exception as exc:  # no network, a proxy error, a corrupt cache, ...
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        where = os.environ.get("TIKTOKEN_CACHE_DIR")
        hint = (f"TIKTOKEN_CACHE_DIR={where} does not hold it" if where else "TIKTOKEN_CACHE_DIR is not set")
        raise GPT2Error(f"could not load the {name!r} tokenizer vocabulary (offline? {reason}); "
                        f"{hint}: set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached "
                        f"{name} files, or run once with network access") from None


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
