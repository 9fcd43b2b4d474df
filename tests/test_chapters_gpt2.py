"""Chapters 02, 04, 05 and 07 (the ones that need the GPT-2 vocabulary, The Verdict or Tiny Shakespeare).

They are not in test_chapters.CHAPTERS because they skip, with the reason, where that material
is missing (offline with no ../shared); chapter 05 runs in its quick setting by default
(GPT2_CHAPTER_QUICK=1: a tiny model, a few steps) and in full as a slow test.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from gpt2_helpers import python_for, tokenizer_or_skip, verdict_or_skip

REPO = Path(__file__).resolve().parent.parent


def _run(chapter, tmp_path, timeout, backend="numpy", needs=(tokenizer_or_skip, verdict_or_skip), **env):
    for need in needs:   # skip, with the reason, where the chapter's material is not available
        need()
    result = subprocess.run([*python_for(backend), str(REPO / "chapters" / chapter)], cwd=REPO,
                            capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "MPLBACKEND": "Agg", "GPT2_CHAPTER_OUT": str(tmp_path),
                                 "MINIGRAD_BACKEND": backend, **env})
    assert result.returncode == 0, (f"{chapter} exited with {result.returncode}\n--- stdout (tail) ---\n"
                                    f"{result.stdout[-3000:]}\n--- stderr (tail) ---\n"
                                    f"{result.stderr[-3000:]}")
    return result.stdout


@pytest.mark.parametrize("backend", ["numpy", "cupy"])
@pytest.mark.parametrize("chapter", ["02_data.py", "04_gpt_model.py"])
def test_chapter_runs(chapter, tmp_path, backend):
    _run(chapter, tmp_path, timeout=300, backend=backend)


@pytest.mark.parametrize("backend", ["numpy", "cupy"])
def test_chapter_05_quick(tmp_path, backend):
    out = _run("05_train.py", tmp_path, timeout=300, backend=backend, GPT2_CHAPTER_QUICK="1")
    assert "Ep 1 (Step 000000)" in out and "reloaded weights identical: True" in out
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "checkpoint" / "model.safetensors").is_file()


@pytest.mark.slow
def test_chapter_05_full_course_run(tmp_path):
    """The course run: 124M shape, 10 epochs on The Verdict (the chapter asserts the losses:
    train below 1.0, validation far higher). Hours on a small CPU; minutes on a GPU."""
    out = _run("05_train.py", tmp_path, timeout=6 * 3600, GPT2_CHAPTER_QUICK="0")
    assert "Ep 10 (Step 000085)" in out


def _shakespeare_or_skip():
    from gpt2 import GPT2Error
    from gpt2.data import named_text_path

    try:
        return named_text_path("shakespeare", download=False)
    except GPT2Error as exc:
        pytest.skip(f"Tiny Shakespeare not available offline: {exc}")


def _run_07(tmp_path, timeout, backend="numpy", **env):
    return _run("07_shakespeare.py", tmp_path, timeout, backend, needs=(_shakespeare_or_skip,), **env)


@pytest.mark.parametrize("backend", ["numpy", "cupy"])
def test_chapter_07_quick(tmp_path, backend):
    out = _run_07(tmp_path, timeout=300, backend=backend, GPT2_CHAPTER_QUICK="1")
    assert "vocabulary: 65 characters" in out and "train 1,003,854 ids, val 111,540 ids" in out
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "checkpoint" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_chapter_07_full_nanogpt_run(tmp_path):
    """nanoGPT's CPU Shakespeare run, 2000 steps: the chapter asserts validation loss <= 1.90."""
    out = _run_07(tmp_path, timeout=3 * 3600, GPT2_CHAPTER_QUICK="0")
    assert "2000 steps in" in out
