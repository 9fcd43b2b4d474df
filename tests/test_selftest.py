"""`python -m gpt2 selftest`: the GPU acceptance run, exercised on the CuPy stand-in (or a real GPU)
and on NumPy; a wrong kernel makes it fail with exit code 1 and says which."""

from __future__ import annotations

import json

import numpy as np

import minigrad as mg
from gpt2.cli import main
from minigrad import kernels


def _report(capsys):
    out = capsys.readouterr().out
    return out, json.loads(out.strip().splitlines()[-1])


def test_selftest_passes_on_cupy(capsys):
    assert main(["selftest", "--backend", "cupy", "--quick", "--no-tests", "--json"]) == 0
    out, report = _report(capsys)
    assert report["ok"] and report["environment"]["backend"] == "cupy"
    assert set(report["checks"]) == {"kernels", "gradients", "training", "generation", "bench"}
    assert report["checks"]["kernels"]["kernels_checked"] == 16
    assert report["checks"]["training"]["last_loss"] < report["checks"]["training"]["first_loss"] - 2
    assert "PASS: 5/5 checks passed" in out and "FAIL" not in out
    assert mg.get_backend() == "numpy"   # the CLI puts the backend back


def test_selftest_on_numpy(capsys):
    assert main(["selftest", "--backend", "numpy", "--quick", "--no-tests", "--json"]) == 0
    _, report = _report(capsys)
    assert report["ok"] and report["environment"]["backend"] == "numpy"


def test_a_wrong_kernel_fails_the_selftest(capsys, monkeypatch):
    gelu = kernels.gelu_forward

    def wrong_on_the_gpu(x):
        y = gelu(x)
        return y * 1.001 if mg.get_backend() == "cupy" else y
    monkeypatch.setattr(kernels, "gelu_forward", wrong_on_the_gpu)
    assert main(["selftest", "--backend", "cupy", "--quick", "--no-tests", "--json"]) == 1
    out, report = _report(capsys)
    assert not report["ok"] and not report["checks"]["kernels"]["ok"]
    assert "gelu_forward (float32): relative error" in report["checks"]["kernels"]["error"]
    assert "FAIL  kernels" in out and "checks passed" in out
    assert np.isfinite(report["checks"]["training"]["last_loss"])   # the other checks still ran


def test_the_full_run_uses_the_course_model():
    """Without --quick, training and bench use the 124M course shape (context 256, no qkv bias)."""
    from gpt2.config import COURSE, config_for

    config = config_for("gpt2-124m", **COURSE)
    assert config.context_length == 256 and config.dropout == 0.1 and not config.qkv_bias
    assert config.num_parameters() == 162_419_712


def test_quick_runs_no_pytest_and_auto_picks_the_cpu_without_a_gpu(capsys, monkeypatch):
    """`selftest --quick` on a machine without a GPU: seconds (no pytest), on numpy, exit 0."""
    from gpt2.cli import selftest

    monkeypatch.setattr(selftest, "run_test_suite", lambda: (_ for _ in ()).throw(AssertionError("ran")))
    monkeypatch.delenv("MINIGRAD_BACKEND", raising=False)

    def no_gpu(name):
        if name == "cupy":
            raise mg.BackendError("backend 'cupy' needs a CUDA GPU, but none was found; use --backend numpy")
        real_set_backend(name)

    real_set_backend = mg.set_backend
    monkeypatch.setattr(mg, "set_backend", no_gpu)
    assert main(["selftest", "--quick", "--json"]) == 0
    out, report = _report(capsys)
    assert report["environment"]["backend"] == "numpy" and "test suite" not in report["checks"]
    assert out.startswith("no GPU to check (backend 'cupy' needs a CUDA GPU, but none was found)")


def test_the_test_suite_report_is_pytests_summary_not_its_dots(monkeypatch):
    import subprocess

    from gpt2.cli import selftest

    class Done:
        returncode = 1
        stdout = ("..........F.....                                 [100%]\n"
                  "=========================== short test summary info ============================\n"
                  "FAILED tests/test_cupy_half.py::test_x - AssertionError\n"
                  "1 failed, 15 passed in 3.21s\n")

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    try:
        selftest.run_test_suite()
    except AssertionError as exc:
        msg = str(exc)
    assert msg.startswith("pytest -k cupy: 1 failed, 15 passed in 3.21s")
    assert "FAILED tests/test_cupy_half.py::test_x" in msg and "....." not in msg
    Done.returncode, Done.stdout = 0, "................ [100%]\n16 passed in 3.0s\n"
    assert selftest.run_test_suite() == {"pytest": "16 passed in 3.0s"}
