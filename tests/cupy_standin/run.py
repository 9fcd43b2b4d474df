"""Run a script or module in a fresh process with the CuPy stand-in in place of CuPy.

    python tests/cupy_standin/run.py chapters/05_train.py            (MINIGRAD_BACKEND=cupy honoured)
    python tests/cupy_standin/run.py -m gpt2 train --backend cupy ...

For the tests' subprocesses (chapters, the CLI in a real process): pytest's conftest installs the
stand-in only inside the pytest process.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path


def main() -> None:
    # tests/, where cupy_standin lives, *instead of* this script's own folder (which Python put
    # first, and whose module names must not shadow anything)
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    # minigrad reads MINIGRAD_BACKEND when imported; hold it back until the stand-in is in place.
    wanted = os.environ.pop("MINIGRAD_BACKEND", None)
    import cupy_standin  # noqa: PLC0415
    import minigrad  # noqa: PLC0415

    cupy_standin.install()
    if wanted:
        os.environ["MINIGRAD_BACKEND"] = wanted
        minigrad.set_backend(wanted)
    args = sys.argv[1:]
    if not args:
        raise SystemExit("usage: run.py SCRIPT.py [ARGS...] | -m MODULE [ARGS...]")
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        sys.path[0] = str(Path(args[0]).resolve().parent)
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
