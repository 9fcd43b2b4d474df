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
them; offline, point `TIKTOKEN_CACHE_DIR` at a folder that holds them (see get_tokenizer).
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


# tiktoken caches each downloaded file under the SHA-1 of its URL; these are GPT-2's two.
TIKTOKEN_CACHE_FILES = {"vocab.bpe": "6d1cbeee0f20b3d9449abfede4726ed8212e3aee",
                        "encoder.json": "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6"}
# and their SHA-256, as tiktoken checks them
_GPT2_SHA256 = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}


@functools.cache
def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    """The `gpt2` BPE tokenizer (cached: built once per process).

    tiktoken downloads GPT-2's vocabulary (vocab.bpe and encoder.json) on first use and keeps it
    in its cache, each file named by the SHA-1 of its URL (TIKTOKEN_CACHE_FILES). Offline, set
    TIKTOKEN_CACHE_DIR to a folder holding either that cache (copied from a machine where it
    ran) or the two files under their own names, vocab.bpe and encoder.json.

    Raises GPT2Error, in one line naming TIKTOKEN_CACHE_DIR, if the vocabulary can be neither
    read nor downloaded.
    """
    import tiktoken  # noqa: PLC0415 - keep `import gpt2` light

    where = os.environ.get("TIKTOKEN_CACHE_DIR")
    try:
        if name == "gpt2" and where and all(os.path.isfile(os.path.join(where, f)) for f in _GPT2_SHA256):
            return Tokenizer(_gpt2_from_files(tiktoken, where))
        return Tokenizer(tiktoken.get_encoding(name))
    except Exception as exc:  # no network, a proxy error, a corrupt cache, ...
        reason = _shorten(" ".join(str(exc).split()) or type(exc).__name__, 160)
        if where and not os.path.isdir(where):
            hint = f"TIKTOKEN_CACHE_DIR={where} is not a folder"
        elif where:
            hint = f"TIKTOKEN_CACHE_DIR={where} does not hold it"
        else:
            hint = "TIKTOKEN_CACHE_DIR is not set"
        raise GPT2Error(f"could not load the {name!r} tokenizer vocabulary (offline? {reason}); {hint}: set "
                        f"TIKTOKEN_CACHE_DIR to a folder holding vocab.bpe and encoder.json (from "
                        f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/), or tiktoken's "
                        f"cache of them (files named {TIKTOKEN_CACHE_FILES['vocab.bpe'][:8]}... and "
                        f"{TIKTOKEN_CACHE_FILES['encoder.json'][:8]}...), or run once with network "
                        "access") from None


def _gpt2_from_files(tiktoken, folder: str):
    """GPT-2's encoding from vocab.bpe and encoder.json in `folder` (checked by SHA-256)."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks  # noqa: PLC0415
    from tiktoken_ext.openai_public import r50k_pat_str  # noqa: PLC0415

    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(folder, "vocab.bpe"),
        encoder_json_file=os.path.join(folder, "encoder.json"),
        vocab_bpe_hash=_GPT2_SHA256["vocab.bpe"], encoder_json_hash=_GPT2_SHA256["encoder.json"])
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT_TOKEN: EOT_ID}, explicit_n_vocab=50257)


def _shorten(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters at a space, with "..." if cut."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


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
    def from_text(cls, text) -> CharTokenizer:
        """The vocabulary of `text` (a string, or any collection of characters): its distinct
        characters, sorted by code point."""
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
