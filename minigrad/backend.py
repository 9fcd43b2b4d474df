"""The array backend: the one place that decides whether arrays live in NumPy (CPU) or CuPy (GPU).

Every op in minigrad reads `backend.xp` *at call time*, so switching backends with
`set_backend("cupy")` changes what every later op computes on. Nothing else in the project
imports cupy.

Also owned here: the default floating dtype (float32 for training; gradient checks use float64)
and the random generator that dropout and weight initialisation draw from, so that a seed makes
a run reproducible and a checkpoint can save and restore the generator exactly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

import numpy as np

xp = np  # the array module in use: numpy or cupy
_name = "numpy"
_cupy = None  # the CuPy module, once the cupy backend has been selected
default_dtype = np.float32

CUPY_INSTALL_HINT = (
    'install the GPU extra: pip install -e ".[cuda12]" (CUDA 12) or ".[cuda13]" (CUDA 13), '
    "on a machine with an NVIDIA GPU"
)


class BackendError(RuntimeError):
    """The requested backend cannot be used here (unknown name, CuPy missing, no GPU)."""


def _import_cupy():
    """`import cupy`, in one place (the tests swap in a strict CPU stand-in for CuPy here)."""
    import cupy  # noqa: PLC0415 - imported only when asked for

    return cupy


def _load_cupy():
    try:
        cupy = _import_cupy()
    except Exception as exc:  # ImportError, or a CUDA library failing to load
        raise BackendError(f"backend 'cupy' needs CuPy, which could not be imported ({exc}); "
                           f"{CUPY_INSTALL_HINT}") from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise BackendError(f"backend 'cupy' needs a CUDA GPU, but none could be used ({exc}); "
                           f"{_cpu_fix}") from None
    if n == 0:
        raise BackendError(f"backend 'cupy' needs a CUDA GPU, but none was found; {_cpu_fix}")
    return cupy


_cpu_fix = "use --backend numpy"   # how to run on the CPU instead, in the words of who asked


def set_backend(name: str) -> None:
    """Select "numpy" (CPU) or "cupy" (GPU) for every array created from now on."""
    global xp, _name, _cupy, env_error
    if name == "numpy":
        xp, _name = np, "numpy"
    elif name == "cupy":
        xp, _name = _load_cupy(), "cupy"
        _cupy = xp
    else:
        raise BackendError(f"unknown backend {name!r}; choose 'numpy' or 'cupy'")
    env_error = None   # a backend chosen explicitly replaces a bad MINIGRAD_BACKEND


class _Unusable:
    """Stands in for `xp` when MINIGRAD_BACKEND names a backend that cannot be used: importing
    still works (so `--help` does), and the first array op raises the error, one line naming the
    variable and the fix (the CLI checks `env_error` before any command runs)."""

    def __init__(self, error: BackendError):
        self._error = error

    def __getattr__(self, attr):
        raise self._error


def get_backend() -> str:
    """The name of the backend in use: "numpy" or "cupy"."""
    return _name


def set_default_dtype(dtype) -> None:
    """Set the floating dtype that new tensors and parameters get (np.float32 or np.float64)."""
    global default_dtype
    dtype = np.dtype(dtype).type
    if dtype not in (np.float16, np.float32, np.float64):
        raise ValueError(f"default dtype must be a float type, got {np.dtype(dtype).name}")
    default_dtype = dtype


def get_default_dtype():
    return default_dtype


# ---------------------------------------------------------------------------------------------
# Which kernels run the CPU's hot loops: compiled Numba loops, or their NumPy twins
# ---------------------------------------------------------------------------------------------

CPU_KERNELS = ("auto", "numba", "numpy")
_cpu_kernels: str | None = None  # "numba" or "numpy" once resolved; None: read the environment


def numba_installed() -> bool:
    """Can Numba be imported here? (Looked up without importing it.)"""
    return importlib.util.find_spec("numba") is not None


def _resolve_cpu_kernels(choice: str) -> str:
    choice = choice.strip().lower() or "auto"
    if choice not in CPU_KERNELS:
        raise ValueError(f"CPU kernels {choice!r}: choose one of {', '.join(CPU_KERNELS)} "
                         "(MINIGRAD_CPU_KERNELS or set_cpu_kernels)")
    have_numba = numba_installed()
    if choice == "numba" and not have_numba:
        raise BackendError('CPU kernels "numba" asked for, but Numba is not installed: '
                           'pip install -e ".[cpu-jit]" (or pip install numba)')
    return "numba" if choice != "numpy" and have_numba else "numpy"


def set_cpu_kernels(choice: str) -> None:
    """On the NumPy backend, run GELU, layer norm, softmax, cross-entropy and AdamW with
    "numba" (compiled loops over all cores, `minigrad.cpu_kernels`), "numpy" (the NumPy twins in
    `minigrad.kernels`), or "auto": Numba where it is installed. Default: MINIGRAD_CPU_KERNELS,
    else "auto". The CuPy backend always uses its own kernels."""
    global _cpu_kernels
    _cpu_kernels = _resolve_cpu_kernels(choice)


def get_cpu_kernels() -> str:
    """"numba" or "numpy": which kernels the NumPy backend's hot loops use (see set_cpu_kernels)."""
    if _cpu_kernels is None:
        set_cpu_kernels(os.environ.get("MINIGRAD_CPU_KERNELS", "auto"))
    return _cpu_kernels


@contextlib.contextmanager
def cpu_kernels(choice: str):
    """`set_cpu_kernels(choice)` inside the block only (tests compare the two this way)."""
    saved = get_cpu_kernels()
    set_cpu_kernels(choice)
    try:
        yield
    finally:
        set_cpu_kernels(saved)


# ---------------------------------------------------------------------------------------------
# Moving arrays between the host and the backend
# ---------------------------------------------------------------------------------------------

def is_cupy_array(a) -> bool:
    """Is `a` a CuPy (device) array? Only possible once the cupy backend has been selected."""
    if _cupy is not None:
        return isinstance(a, _cupy.ndarray)
    return type(a).__module__.startswith("cupy")  # a CuPy array made outside minigrad


def to_numpy(a) -> np.ndarray:
    """Any array (NumPy or CuPy) as a NumPy array on the host."""
    if is_cupy_array(a):
        return a.get()
    return np.asarray(a)


def asarray(a, dtype=None):
    """Any array-like as an array of the current backend (copied across devices if needed)."""
    if _name == "numpy":
        return np.asarray(to_numpy(a), dtype=dtype)
    return xp.asarray(a, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Random numbers
# ---------------------------------------------------------------------------------------------

class RandomGenerator:
    """One seeded source of randomness for weight init, dropout and sampling.

    Its state is a small JSON-able dict, so training checkpoints can save it and a resumed run
    draws exactly the same numbers as an uninterrupted one.

    On NumPy this is a PCG64 `Generator`, whose state is plain integers. CuPy's generators cannot
    export their state, so on CuPy every draw uses a fresh generator seeded with (seed, number of
    draws so far): the state is then just those two integers.
    """

    def __init__(self, seed: int = 0):
        self.seed(seed)

    def seed(self, seed: int) -> None:
        self._seed = int(seed)
        self._draws = 0
        self._np = np.random.Generator(np.random.PCG64(self._seed))

    def _cupy_gen(self):
        self._draws += 1
        return xp.random.default_rng(np.random.SeedSequence([self._seed, self._draws]).generate_state(1)[0])

    def random(self, shape, dtype=None):
        """Uniform samples in [0, 1) on the current backend."""
        draw_dtype = np.float64 if (dtype or default_dtype) == np.float64 else np.float32
        gen = self._np if _name == "numpy" else self._cupy_gen()
        return gen.random(shape, dtype=draw_dtype)

    def normal(self, shape, std=1.0, dtype=None):
        """Normal(0, std) samples on the current backend, as `dtype`."""
        dtype = dtype or default_dtype
        draw_dtype = np.float64 if dtype == np.float64 else np.float32
        gen = self._np if _name == "numpy" else self._cupy_gen()
        out = gen.standard_normal(shape, dtype=draw_dtype)
        out *= std
        return out.astype(dtype, copy=False)

    def get_state(self) -> dict:
        return {"seed": self._seed, "draws": self._draws, "pcg64": self._np.bit_generator.state}

    def set_state(self, state: dict) -> None:
        """Back to a state from `get_state`; ValueError (and this generator unchanged) if it is not
        one, e.g. read from a damaged file."""
        def whole(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0
        if not (isinstance(state, dict) and whole(state.get("seed")) and whole(state.get("draws"))
                and isinstance(state.get("pcg64"), dict)):
            raise ValueError("rng_state is not a random generator state (seed, draws, pcg64)")
        generator = np.random.Generator(np.random.PCG64(state["seed"]))
        try:
            generator.bit_generator.state = state["pcg64"]
        except Exception:   # NumPy checks the bit generator's state; its errors vary by kind
            raise ValueError("rng_state is not a valid PCG64 state") from None
        self._seed, self._draws, self._np = state["seed"], state["draws"], generator


_rng = RandomGenerator(0)


def manual_seed(seed: int) -> None:
    """Seed minigrad's generator: the same seed gives the same weights and dropout masks."""
    _rng.seed(seed)


def rng() -> RandomGenerator:
    return _rng


class _NoInitGenerator:
    """Stands in for the generator inside `no_init()`: every 'random' array is a read-only
    zero-strided view (no memory, no time), and the real generator's stream is left untouched."""

    def random(self, shape, dtype=None):
        return self.normal(shape, dtype=dtype)

    def normal(self, shape, std=1.0, dtype=None):
        return xp.broadcast_to(xp.zeros((), dtype=dtype or default_dtype), shape)


@contextlib.contextmanager
def no_init():
    """Build modules without drawing their random initial weights, for a model that is about to
    have every parameter replaced by loaded ones (a checkpoint, OpenAI's weights). Saves the
    time of the random draws and the memory of a second copy of the weights, and leaves the
    seeded generator exactly where it was. The placeholders are read-only: load before use."""
    global _rng
    saved, _rng = _rng, _NoInitGenerator()
    try:
        yield
    finally:
        _rng = saved


def get_rng_state() -> dict:
    return _rng.get_state()


def set_rng_state(state: dict) -> None:
    _rng.set_state(state)


# ---------------------------------------------------------------------------------------------
# Memory reuse on the CPU
# ---------------------------------------------------------------------------------------------

def tune_malloc() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    Why: a training step allocates a few GB of fresh arrays (activations, gradients,
    temporaries) and frees them again. By default glibc serves every block over 32 MB with its
    own `mmap` and unmaps it on free, so every step the kernel maps and zeroes all those pages
    again. With a high mmap threshold the blocks come from the heap and are reused step after
    step; the price is that the process keeps its peak memory.

    It changes the whole process's allocator, so importing minigrad does not do it: a program
    that trains calls it once at start-up (`python -m gpt2` does). Linux with glibc only;
    elsewhere, or with MINIGRAD_KEEP_FREED_MEMORY=0, nothing changes. Returns whether the
    setting was applied.
    """
    if os.environ.get("MINIGRAD_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # from glibc's malloc.h
        ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)   # blocks under 1 GiB come from the heap
        ok &= libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # and freed heap memory is not trimmed
        ok &= libc.mallopt(M_TOP_PAD, 64 << 20)          # grow the heap 64 MiB at a time
        return bool(ok)
    except (OSError, AttributeError):  # not glibc (musl, macOS): keep the defaults
        return False


# Environment override: MINIGRAD_BACKEND=cupy python chapters/05_train.py
env_error: BackendError | None = None   # why MINIGRAD_BACKEND could not be used, if it could not


def _backend_from_env() -> None:
    global xp, env_error, _cpu_fix
    value = os.environ.get("MINIGRAD_BACKEND", "")
    if value in ("", "numpy"):
        return
    if value not in ("numpy", "cupy"):
        env_error = BackendError(f"MINIGRAD_BACKEND={value!r} is not a backend; set it to numpy (CPU) or "
                                 "cupy (NVIDIA GPU), or unset it")
    else:
        _cpu_fix = "unset MINIGRAD_BACKEND (or set it to numpy) to run on the CPU"
        try:
            set_backend(value)
        except BackendError as exc:
            env_error = BackendError(f"MINIGRAD_BACKEND={value}: {exc}" + (
                "" if "MINIGRAD_BACKEND" in str(exc) else "; or unset MINIGRAD_BACKEND to run on the CPU"))
        finally:
            _cpu_fix = "use --backend numpy"
    if env_error is not None:
        xp = _Unusable(env_error)


_backend_from_env()
