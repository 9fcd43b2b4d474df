"""cupy.cuda, as far as the project uses it: one device, synchronisation, device properties,
streams and events, and `nccl` (tests/cupy_standin/_nccl.py).

Everything runs synchronously on the CPU, so synchronising is a no-op; the device reports
itself as a stand-in so that no output of a test run can be mistaken for a real GPU's.
"""

from __future__ import annotations

from . import _nccl as nccl  # noqa: F401 - cupy.cuda.nccl (data-parallel collectives, over MPI)

DEVICE_NAME = "CuPy stand-in (CPU)"


class Device:
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        if self.id != 0:
            raise RuntimeError("cudaErrorInvalidDevice: invalid device ordinal")

    def synchronize(self):
        return None

    def use(self):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @property
    def compute_capability(self):
        return "90"

    @property
    def mem_info(self):
        return (0, 0)


class _Runtime:
    @staticmethod
    def getDeviceCount():  # noqa: N802 - CuPy's name
        return 1

    @staticmethod
    def getDevice():  # noqa: N802
        return 0

    @staticmethod
    def setDevice(device):  # noqa: N802
        Device(device)

    @staticmethod
    def getDeviceProperties(device):  # noqa: N802
        Device(device)
        return {"name": DEVICE_NAME.encode(), "major": 9, "minor": 0, "totalGlobalMem": 0}

    @staticmethod
    def runtimeGetVersion():  # noqa: N802
        return 0

    @staticmethod
    def driverGetVersion():  # noqa: N802
        return 0

    @staticmethod
    def deviceSynchronize():  # noqa: N802
        return None


runtime = _Runtime()


class Event:
    """A CUDA event: work queued before it has finished when `done` (here: always, since
    everything runs synchronously)."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.ptr = 0

    @property
    def done(self):
        return True

    def record(self, stream=None):
        return None

    def synchronize(self):
        return None


class Stream:
    def __init__(self, null=False, non_blocking=False, ptr=0):
        self.ptr = ptr

    def synchronize(self):
        return None

    def record(self, event=None):
        """Record `event` (a new one if None) on this stream and return it."""
        event = event if event is not None else Event()
        event.record(self)
        return event

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


Stream.null = Stream(null=True)


def get_current_stream(device_id=-1):
    return Stream.null


def is_available():
    return True
