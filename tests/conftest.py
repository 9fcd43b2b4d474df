"""Shared pytest fixtures.

`backend`: run a test once on NumPy and once on CuPy (the CuPy run is skipped cleanly where CuPy or
a GPU is missing). Every test also starts from minigrad seed 0 and ends with float32 as the default
dtype, so no test depends on what ran before it.
"""

from __future__ import annotations

import numpy as np
import pytest

import minigrad


@pytest.fixture(params=["numpy", "cupy"])
def backend(request):
    """The name of the active backend; numpy is restored afterwards."""
    try:
        minigrad.set_backend(request.param)
    except minigrad.BackendError:
        pytest.skip("CuPy/GPU not available")
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
