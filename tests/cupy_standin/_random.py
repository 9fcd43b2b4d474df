"""cupy.random, as far as the project uses it: `default_rng(seed)` and its Generator.

CuPy's generator (XORWOW by default) draws a different stream from NumPy's PCG64, so the
stand-in deliberately does not reuse the seed as NumPy would: it mixes the seed first, so a test
can never pass only because the "GPU" happened to draw NumPy's numbers.
"""

from __future__ import annotations

import numpy as np

from ._array import ndarray

_STREAM_TAG = 0x5EED_C0DE  # makes the stand-in's stream differ from NumPy's for the same seed


class Generator:
    def __init__(self, seed):
        self._np = np.random.default_rng([_STREAM_TAG, int(seed)])

    def random(self, size=None, dtype=np.float64, out=None):
        return self._fill(self._np.random(size, dtype=dtype), out)

    def standard_normal(self, size=None, dtype=np.float64, out=None):
        return self._fill(self._np.standard_normal(size, dtype=dtype), out)

    def integers(self, low, high=None, size=None, dtype=np.int64, endpoint=False):
        return ndarray(np.asarray(self._np.integers(low, high, size, dtype=dtype, endpoint=endpoint)))

    def uniform(self, low=0.0, high=1.0, size=None, dtype=np.float64):
        return ndarray(np.asarray(self._np.uniform(low, high, size).astype(dtype)))

    @staticmethod
    def _fill(values, out):
        values = np.asarray(values)
        if out is not None:
            out._a[...] = values
            return out
        return ndarray(values)


def default_rng(seed=None):
    if seed is None:
        seed = np.random.SeedSequence().entropy
    return Generator(seed)
