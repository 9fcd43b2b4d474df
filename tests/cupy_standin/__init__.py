"""A strict CPU stand-in for CuPy, for the tests only (it never ships in the package).

No machine that runs this project's CI has a GPU, yet half of the project runs through CuPy.
This package lets the whole CuPy half of the test suite run on the CPU, held to CuPy's rules
where they differ from NumPy's:

* arrays are not NumPy arrays and refuse implicit conversion to the host (`_array.py`);
* NumPy arrays mixed into device operations raise TypeError, as on CuPy;
* only functions and array attributes that the real CuPy 14.2 has exist, each bound to CuPy's
  own signature (`_signatures.py`, checked against the installed CuPy by the tests);
* `ElementwiseKernel` / `ReductionKernel` compile *the same kernel source* with the machine's
  C++ compiler and run it on the CPU (`_kernels.py`), so fused kernels are checked against
  their NumPy twins;
* `random.default_rng`, the memory pool and `cuda` (Device, synchronize, device properties)
  cover what the project calls.

It is put in place only by `install()` (tests/conftest.py does this when no real GPU is
usable), which makes `minigrad.set_backend("cupy")` load this module instead of `cupy`.
What it cannot catch: launch-configuration errors, races, memory faults and GPU rounding.
"""

from __future__ import annotations

from . import _random as random  # noqa: F401 - cupy.random (named _random: never shadows the stdlib)
from . import cuda  # noqa: F401
from ._api import *  # noqa: F401,F403 - the CuPy namespace
from ._api import __all__ as _api_all
from ._array import ndarray  # noqa: F401
from ._kernels import ElementwiseKernel, ReductionKernel  # noqa: F401

__version__ = "14.2.0-standin"
IS_STANDIN = True

__all__ = [*_api_all, "ElementwiseKernel", "ReductionKernel", "cuda", "random"]


def install():
    """Make `minigrad.set_backend("cupy")` use this stand-in (for this process)."""
    import sys  # noqa: PLC0415

    from minigrad import backend  # noqa: PLC0415

    backend._import_cupy = lambda: sys.modules[__name__]
