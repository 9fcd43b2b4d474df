"""Shared pytest fixtures.

`backend`: run a test once on NumPy and once on CuPy. Where CuPy cannot use a real GPU (every
CI machine), the CuPy run uses the strict CPU stand-in in `tests/cupy_standin/` instead of
skipping: same project code, CuPy's rules, the same kernel sources compiled for the CPU. With a
real GPU, the real CuPy is used. Every test also starts from minigrad seed 0 and ends with
float32 as the default dtype, so no test depends on what ran before it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Importing CuPy creates its kernel cache (~/.cupy/kernel_cache by default) and compiling fills it.
# The tests keep both in a temporary folder, chosen before anything can import CuPy and removed at
# the end of the session (unless CUPY_CACHE_DIR was set by whoever runs the tests).
_CUPY_CACHE_SET_BY_US = "CUPY_CACHE_DIR" not in os.environ
if _CUPY_CACHE_SET_BY_US:
    os.environ["CUPY_CACHE_DIR"] = tempfile.mkdtemp(prefix="minigrad-tests-cupy-cache-")


# The Hugging Face cache too: a user's real cache may hold OpenAI's weights, and tests (chapter
# 06, `--pretrained gpt2`) must see the same empty cache on every machine. Offline as well, so
# that nothing tries the network; tests/test_hub.py sets its own cache and endpoint.
_HF_CACHE = tempfile.mkdtemp(prefix="minigrad-tests-hf-cache-")
os.environ["HF_HUB_CACHE"] = _HF_CACHE
os.environ["HF_HUB_OFFLINE"] = "1"


def pytest_unconfigure(config):
    if _CUPY_CACHE_SET_BY_US:
        shutil.rmtree(os.environ.pop("CUPY_CACHE_DIR"), ignore_errors=True)
    shutil.rmtree(_HF_CACHE, ignore_errors=True)


import minigrad  # noqa: E402

# Offline material for the tests, when the project's CI folder sits beside the checkout: the
# story and Tiny Shakespeare (gpt2.data's local mirror) and tiktoken's GPT-2 vocabulary. Set in the
# environment so that subprocesses (chapters, the CLI) see them too. Tests that need them skip
# with a reason where they are missing.
_SHARED = Path(__file__).resolve().parents[2] / "shared"
if (_SHARED / "data").is_dir():
    os.environ.setdefault("GPT2_DATA_MIRROR", str(_SHARED / "data"))
if (_SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_SHARED / "tiktoken_cache"))

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import cupy_standin  # noqa: E402


def _real_gpu() -> bool:
    """Can the real CuPy use a GPU here? (Set MINIGRAD_TEST_STANDIN=1 to use the stand-in anyway.)"""
    if os.environ.get("MINIGRAD_TEST_STANDIN") == "1":
        return False
    try:
        minigrad.set_backend("cupy")
    except minigrad.BackendError:
        return False
    finally:
        minigrad.set_backend("numpy")
    return True


REAL_GPU = _real_gpu()
if not REAL_GPU:
    cupy_standin.install()
# For tests that start processes: run them through tests/cupy_standin/run.py when "standin".
os.environ["MINIGRAD_TEST_CUPY"] = "real" if REAL_GPU else "standin"


def cupy_is_standin() -> bool:
    return not REAL_GPU


@pytest.fixture(params=["numpy", "cupy"])
def backend(request):
    """The name of the active backend; numpy is restored afterwards."""
    minigrad.set_backend(request.param)
    try:
        yield request.param
    finally:
        minigrad.set_backend("numpy")


@pytest.fixture(autouse=True)
def _reset_minigrad_state():
    """Seed minigrad's generator before each test; reseed and restore float32 after it."""
    minigrad.manual_seed(0)
    yield
    minigrad.manual_seed(0)
    minigrad.set_default_dtype(np.float32)


class _CupyWithoutGpu:
    """What `import cupy` gives on a machine with CuPy but no usable GPU: device calls raise."""

    class cuda:  # noqa: N801
        class runtime:  # noqa: N801
            @staticmethod
            def getDeviceCount():  # noqa: N802
                raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")


def _cupy_not_installed():
    raise ModuleNotFoundError("No module named 'cupy'")


@pytest.fixture(params=["not installed", "no GPU"])
def cupy_unusable(request, monkeypatch):
    """Make `set_backend("cupy")` fail as it does without CuPy, or with CuPy but no GPU."""
    found = _cupy_not_installed if request.param == "not installed" else (lambda: _CupyWithoutGpu)
    monkeypatch.setattr(minigrad.backend, "_import_cupy", found)
    return request.param


@pytest.fixture
def cupy_not_installed(monkeypatch):
    monkeypatch.setattr(minigrad.backend, "_import_cupy", _cupy_not_installed)


# The CuPy stand-in runs most tests a second time. A few of those second runs repeat on it what
# another stand-in run in the default suite already checks (the same code path at another size,
# or a chapter whose every step the CLI's stand-in tests take too), at 10-20 s each on 2 cores:
# they run with `pytest -m slow`, so that the default suite stays within minutes.
STANDIN_REPEATS_RUN_WITH_SLOW = {
    "test_resume.py::test_interrupted_and_resumed_equals_uninterrupted[cupy-1]",    # [cupy-70] stays
    "test_resume.py::test_interrupted_and_resumed_equals_uninterrupted[cupy-6]",
    "test_resume.py::test_interrupted_and_resumed_equals_uninterrupted[cupy-epoch end]",
    "test_model.py::test_whole_model_gradcheck_float64[cupy-True]",                 # [cupy-False] stays
    "test_chapters_gpt2.py::test_chapter_05_quick[cupy]",         # test_cli/test_resume: train on cupy
    "test_chapters_finetune.py::test_chapter_09_classification_quick[cupy]",   # test_finetune_on_cupy
    "test_chapters_finetune.py::test_chapter_10_instruction_quick_then_12_starts_from_its_checkpoint[cupy]",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    found = set()
    for item in items:
        name = f"{Path(item.fspath).name}::{item.name}"
        if name in STANDIN_REPEATS_RUN_WITH_SLOW:
            item.add_marker(pytest.mark.slow)
            found.add(name)
    if len(items) > 500 and found != STANDIN_REPEATS_RUN_WITH_SLOW:   # a whole-suite collection
        missing = ", ".join(sorted(STANDIN_REPEATS_RUN_WITH_SLOW - found))
        raise pytest.UsageError(f"conftest.STANDIN_REPEATS_RUN_WITH_SLOW names tests that no longer "
                                f"exist: {missing}")
