"""Chapters 09-12 (fine-tuning: classification, instructions, LoRA, DPO), in their quick setting
(GPT2_CHAPTER_QUICK=1: a tiny model, a few steps), on NumPy and with MINIGRAD_BACKEND=cupy (the
CuPy stand-in where there is no GPU).

They need GPT-2's vocabulary and the book's fine-tuning data (the SMS Spam Collection, the
instruction and preference files), and skip with the reason where those are not available
offline. OpenAI's weights are never used here: the cache is pointed at an empty folder, so each
chapter takes its own small model, except in the test that hands chapter 09 a tiny model in the
Hugging Face layout as if it were OpenAI's.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from gpt2_helpers import python_for, tokenizer_or_skip

REPO = Path(__file__).resolve().parent.parent


def _data_or_skip(name):
    from gpt2 import GPT2Error
    from gpt2.finetune import finetune_file

    try:
        return finetune_file(name, download=False)
    except GPT2Error as exc:
        pytest.skip(f"fine-tuning data {name!r} not available offline: {exc}")


def _run(chapter, tmp_path, backend="numpy", data=(), timeout=300, **env):
    tokenizer_or_skip()
    for name in data:
        _data_or_skip(name)
    environ = {k: v for k, v in os.environ.items() if k != "GPT2_PRETRAINED_DIR"}
    (tmp_path / "empty_cache").mkdir(exist_ok=True)
    result = subprocess.run([*python_for(backend), str(REPO / "chapters" / chapter)], cwd=REPO,
                            capture_output=True, text=True, timeout=timeout,
                            env={**environ, "MPLBACKEND": "Agg", "MINIGRAD_BACKEND": backend,
                                 "GPT2_CHAPTER_QUICK": "1", "GPT2_CHAPTER_OUT": str(tmp_path),
                                 "GPT2_OFFLINE": "1", "GPT2_CACHE": str(tmp_path / "empty_cache"), **env})
    assert result.returncode == 0, (f"{chapter} exited with {result.returncode}\n--- stdout (tail) ---\n"
                                    f"{result.stdout[-3000:]}\n--- stderr (tail) ---\n"
                                    f"{result.stderr[-3000:]}")
    return result.stdout


@pytest.mark.parametrize("backend", ["numpy", "cupy"])
def test_chapter_09_classification_quick(tmp_path, backend):
    out = _run("09_classification.py", tmp_path, backend, data=("sms_spam",))
    assert "Starting from a small GPT of OUR OWN with RANDOM weights" in out
    assert "balanced: 1,494; train 1045, val 149, test 300" in out
    assert "test       accuracy" in out and (tmp_path / "loss.png").is_file()


@pytest.mark.parametrize("backend", ["numpy", "cupy"])
def test_chapter_10_instruction_quick_then_12_starts_from_its_checkpoint(tmp_path, backend):
    out = _run("10_instruction.py", tmp_path, backend, data=("instructions",))
    assert "train 935, validation 55, test 110" in out and "Model response:" in out
    assert (tmp_path / "checkpoint" / "tokenizer.json").is_file() and (tmp_path / "loss.png").is_file()
    out = _run("12_dpo.py", tmp_path, backend, data=("preferences",))
    assert "Starting from chapter 10's instruction-tuned model" in out


@pytest.mark.parametrize("backend", ["numpy", "cupy"])
def test_chapter_11_lora_quick(tmp_path, backend):
    out = _run("11_lora.py", tmp_path, backend, data=("sms_spam",))
    assert "gradcheck of low_rank_update (x, A, B): passed" in out
    assert "LoRA r=16 trains 2,371,616" in out and "test accuracy after merging" in out


@pytest.mark.parametrize("backend", ["numpy", "cupy"])
def test_chapter_12_dpo_quick(tmp_path, backend):
    out = _run("12_dpo.py", tmp_path, backend, data=("preferences",))
    assert "Starting from a small GPT of OUR OWN with RANDOM weights" in out
    assert "DPO loss at the start 0.693147" in out


def test_chapter_09_uses_pretrained_weights_when_given(tmp_path):
    """GPT2_PRETRAINED_DIR: the chapter takes those weights (here a tiny model exported in the
    Hugging Face layout, standing in for OpenAI's) and the book's learning rate."""
    import minigrad as mg
    from gpt2 import GPTConfig, GPTModel
    from gpt2.pretrained import export_hf

    mg.manual_seed(0)
    tiny = GPTModel(GPTConfig(vocab_size=50257, context_length=128, emb_dim=16, n_heads=2, n_layers=2,
                              dropout=0.1))
    weights = export_hf(tiny, tmp_path / "tiny-hf")
    out = _run("09_classification.py", tmp_path, data=("sms_spam",), GPT2_PRETRAINED_DIR=str(weights))
    assert f"Starting from OpenAI's weights: {weights}" in out
    assert "OUR OWN" not in out
