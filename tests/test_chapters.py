"""Every chapter script runs top to bottom without error (each one asserts its own results)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from gpt2_helpers import python_for, tokenizer_or_skip

REPO = Path(__file__).resolve().parent.parent

# Chapters that run quickly enough for the default test run; append new ones here.
CHAPTERS = ["01_autograd.py", "03_attention.py", "06_pretrained.py", "08_data_parallel.py"]


@pytest.mark.parametrize("backend", ["numpy", "cupy"])
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_runs(chapter, backend):
    """Each chapter on NumPy and with MINIGRAD_BACKEND=cupy (the CuPy stand-in without a GPU)."""
    path = REPO / "chapters" / chapter
    assert path.exists(), f"missing chapter {path}"
    if chapter == "06_pretrained.py":
        tokenizer_or_skip()   # it tokenizes prompts with GPT-2's vocabulary
    result = subprocess.run([*python_for(backend), str(path)], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "MPLBACKEND": "Agg", "MINIGRAD_BACKEND": backend,
                                                      # never download 548 MB of weights in a test
                                                      "GPT2_OFFLINE": "1", "GPT2_CHAPTER_QUICK": "1"})
    assert result.returncode == 0, (f"{chapter} exited with {result.returncode}\n"
                                    f"--- stdout (tail) ---\n{result.stdout[-3000:]}\n"
                                    f"--- stderr (tail) ---\n{result.stderr[-3000:]}")


@pytest.mark.parametrize("chapter", sorted(p.name for p in (REPO / "chapters").glob("[0-9]*.py")))
def test_chapter_opens_as_a_notebook(chapter):
    """README offers the chapters as notebooks through jupytext (the `notebooks` extra, in `dev`):
    each `# %%` script becomes a valid notebook of several cells, markdown and code, and back."""
    jupytext = pytest.importorskip("jupytext", reason="the notebooks extra (jupytext) is not installed")
    nbformat = pytest.importorskip("nbformat", reason="the notebooks extra (jupytext) is not installed")
    source = (REPO / "chapters" / chapter).read_text(encoding="utf-8")
    nb = jupytext.reads(source, fmt="py:percent")
    kinds = [c.cell_type for c in nb.cells]
    assert kinds.count("code") >= 3, kinds
    nbformat.validate(nbformat.reads(jupytext.writes(nb, fmt="ipynb"), as_version=4))
    again = jupytext.reads(jupytext.writes(nb, fmt="py:percent"), fmt="py:percent")
    code = "".join(c.source for c in again.cells if c.cell_type == "code")
    assert code == "".join(c.source for c in nb.cells if c.cell_type == "code")
