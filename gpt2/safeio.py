"""Files that survive a crash, and files that cannot hurt the machine that reads them.

Writing: `atomic_write` writes a temporary file beside the target, flushes it to disk (fsync),
renames it over the target in one step and fsyncs the folder, so whoever reads the path -- even
after a power cut or a `kill -9` at any moment -- sees the old file or the new one, never half
of one.

Reading: only JSON and safetensors, never pickle (which runs code while it loads). A safetensors
file is 8 bytes of little-endian header length N, N bytes of JSON describing every tensor
(dtype, shape, byte offsets), then the raw bytes. `read_safetensors_header` checks everything
the header claims against the file's real size *before* any tensor is allocated -- a forged
header that claims a terabyte tensor costs nothing -- and `read_safetensors` then reads each
tensor's bytes straight into an array of the checked size. Any problem is one `GPT2Error` naming
the file (and the tensor), never a crash or another exception type.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import GPT2Error

MAX_HEADER_BYTES = 100_000_000      # safetensors' own limit for the JSON header
MAX_JSON_BYTES = 256 << 20          # config.json / trainer_state.json are kilobytes; refuse the absurd

# Every dtype the safetensors format defines, with its size in bits (for the offset checks), and
# the NumPy type for those we can read.
SAFETENSORS_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "I16": 16, "U16": 16,
                          "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64,
                          "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "E8M0": 8}
NUMPY_DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16,
                "F16": np.float16, "I32": np.int32, "U32": np.uint32, "F32": np.float32, "I64": np.int64,
                "U64": np.uint64, "F64": np.float64}
FLOAT_DTYPES = ("F16", "F32", "F64")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def fsync_dir(path) -> None:
    """Make the renames inside folder `path` durable (POSIX); a no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The permissions a plain open()/mkdir() would give (temporary files get 0600/0700)."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write(path, write) -> Path:
    """Call `write(tmp_path)` to fill a temporary file beside `path`, fsync it, rename it onto
    `path` and fsync the folder. On any error (or Ctrl-C) the temporary file is removed and
    `path` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def write_text(path, text: str) -> Path:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, write)


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> Path:
    """Host arrays (NumPy) -> a safetensors file, atomically."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    arrays = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata=metadata))


# ---------------------------------------------------------------------------------------------
# Reading JSON
# ---------------------------------------------------------------------------------------------

def read_json(path, fix: str = "") -> object:
    """The JSON value in `path`; GPT2Error (naming the file) if it is missing, too big, not UTF-8
    or not JSON. `fix` is appended to the message (what the user can do about it)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise GPT2Error(f"cannot read {path}: {size:,} bytes is far too big for this file{fix}")
        with open(path, "rb") as f:
            raw = f.read()     # (read(n) would reserve n bytes up front)
        return json.loads(raw.decode("utf-8"))
    except GPT2Error:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers too long to convert
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise GPT2Error(f"cannot read {path}: {detail}{fix}") from None


# ---------------------------------------------------------------------------------------------
# Reading safetensors
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    """One entry of a checked safetensors header; offsets are relative to the data section."""
    name: str
    dtype: str       # the format's name: "F32", "F16", ...
    shape: tuple
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict            # name -> TensorInfo, in file order
    metadata: dict           # the "__metadata__" strings (may be empty)
    data_start: int          # 8 + header length


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_safetensors_header(path, fix: str = "", size: int | None = None) -> SafetensorsHeader:
    """Read and check a safetensors header without reading (or allocating) any tensor.

    Checked: the header length against the file size, the JSON, every entry's fields and types,
    that the dtype is one the format defines, that each tensor's byte range lies inside the file
    (else: "truncated", naming the tensor), that the range's length is exactly shape x dtype
    size, and that the ranges tile the data section with no gap, overlap or trailing bytes (as
    the safetensors library requires). Any failure is a GPT2Error naming the file.
    """
    path = Path(path)

    def bad(problem: str):
        return GPT2Error(f"{path} {problem}{fix}")

    try:
        size = os.path.getsize(path) if size is None else size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"is not a safetensors file (only {len(head)} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise bad(f"is truncated or not a safetensors file (header of {n:,} bytes, file of {size:,})")
            raw = f.read(n)
    except OSError as exc:
        raise bad(f"cannot be read ({exc.strerror or exc})") from None
    if len(raw) != n:
        raise bad(f"is truncated (header of {n:,} bytes, {len(raw):,} read)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        detail = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise bad(f"has a corrupt safetensors header ({detail})") from None
    if not isinstance(header, dict):
        raise bad("has a corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("has a corrupt safetensors header (__metadata__ must map names to strings)")
    data_size = size - 8 - n
    tensors = {}
    for name, info in header.items():
        def entry(problem, name=name):
            return bad(f"has a corrupt safetensors header: tensor {name!r} {problem}")
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise entry("lacks dtype, shape or data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
            raise entry(f"has unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape) or len(shape) > 16:
            raise entry(f"has an invalid shape {str(shape)[:60]}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise entry(f"has invalid data_offsets {str(offsets)[:60]}")
        begin, end = offsets
        if end > data_size:
            raise bad(f"is truncated: tensor {name!r} needs bytes up to {8 + n + end:,} but the file has "
                      f"{size:,}")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype]
        if nbytes % 8 or nbytes // 8 != end - begin:
            raise entry(f"of shape {tuple(shape)} and dtype {dtype} does not fit its {end - begin:,} bytes")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), begin, end)
    position = 0
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin != position:
            raise bad(f"has a corrupt safetensors header: tensor {t.name!r} "
                      f"{'overlaps another' if t.begin < position else 'leaves a gap before it'}")
        position = t.end
    if position != data_size:
        raise bad(f"is corrupt: {data_size - position:,} bytes after the last tensor")
    return SafetensorsHeader(path, tensors, metadata, 8 + n)


def read_safetensors(path, dtypes=FLOAT_DTYPES, fix: str = "", check_finite: bool = True,
                     header: SafetensorsHeader | None = None) -> dict:
    """{name: NumPy array} from a safetensors file, after `read_safetensors_header`'s checks.

    `dtypes`: the dtype names allowed (default: floats); `check_finite`: NaN or infinity in a
    float tensor is a GPT2Error naming it. Memory used is at most the file's size.
    """
    header = header or read_safetensors_header(path, fix)
    path = Path(path)
    for t in header.tensors.values():
        if t.dtype not in dtypes or t.dtype not in NUMPY_DTYPES:
            raise GPT2Error(f"{path}: tensor {t.name!r} has dtype {t.dtype}; expected "
                            f"{' or '.join(d for d in dtypes)}{fix}")
    out = {}
    try:
        with open(path, "rb") as f:
            for t in header.tensors.values():
                buf = bytearray(t.end - t.begin)
                f.seek(header.data_start + t.begin)
                if f.readinto(buf) != len(buf):
                    raise GPT2Error(f"{path} is truncated: tensor {t.name!r} is incomplete{fix}")
                array = np.frombuffer(buf, dtype=np.dtype(NUMPY_DTYPES[t.dtype]).newbyteorder("<"))
                array = array.reshape(t.shape).astype(NUMPY_DTYPES[t.dtype], copy=False)
                if check_finite and array.dtype.kind == "f" and not np.isfinite(array).all():
                    raise GPT2Error(f"{path}: tensor {t.name!r} contains NaN or infinity{fix}")
                out[t.name] = array
    except OSError as exc:
        raise GPT2Error(f"{path} cannot be read ({exc.strerror or exc}){fix}") from None
    return out
