"""Helpers for the gpt2 tests: tiny models, a byte-level stand-in tokenizer, and skips for the
material that may be missing offline (the GPT-2 vocabulary, The Verdict)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import minigrad as mg
from gpt2 import GPT2Error, GPTConfig, GPTModel


def tiny_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=64, context_length=16, emb_dim=16, n_heads=2, n_layers=2, dropout=0.0,
                qkv_bias=True, tie_embeddings=False)
    return GPTConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides) -> GPTModel:
    mg.manual_seed(seed)
    return GPTModel(tiny_config(**overrides))


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256): lets data and training tests run without tiktoken."""

    n_vocab = 256
    eot_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in np.asarray(ids).reshape(-1)).decode("utf-8", errors="replace")


def tokenizer_or_skip():
    from gpt2.tokenizer import get_tokenizer

    try:
        return get_tokenizer()
    except GPT2Error as exc:
        pytest.skip(f"GPT-2 vocabulary not available offline (set TIKTOKEN_CACHE_DIR): {exc}")


def named_text_or_skip(name: str):
    """Path to a named text (verdict, shakespeare) without downloading -- the data folder or
    $GPT2_DATA_MIRROR -- else skip."""
    from gpt2.data import named_text_path

    try:
        return named_text_path(name, download=False)
    except GPT2Error as exc:
        pytest.skip(f"{name} not available offline: {exc}")


def verdict_or_skip():
    """Path to The Verdict without downloading (data/, $GPT2_DATA or ../shared), else skip."""
    from gpt2.data import verdict_path

    try:
        return verdict_path(download=False)
    except GPT2Error as exc:
        pytest.skip(f"The Verdict not available offline: {exc}")


STANDIN_RUN = Path(__file__).resolve().parent / "cupy_standin" / "run.py"


def python_for(backend: str) -> list[str]:
    """The command that starts Python for a subprocess on `backend`: plain Python, or (for cupy
    where no GPU is usable) Python through the CuPy stand-in's runner."""
    if backend == "cupy" and os.environ.get("MINIGRAD_TEST_CUPY", "standin") == "standin":
        return [sys.executable, str(STANDIN_RUN)]
    return [sys.executable]


PLAY = ("ROMEO: But soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
        "JULIET: O Romeo, Romeo, wherefore art thou Romeo?\n") * 30


def char_dataset(folder: Path) -> Path:
    """A prepared character-level dataset of PLAY in `folder`/ds."""
    from gpt2.prepare import prepare

    src = folder / "play.txt"
    src.write_text(PLAY, encoding="utf-8")
    prepare([src], folder / "ds", tokenizer="char", progress=False)
    return folder / "ds"
