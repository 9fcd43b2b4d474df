"""Backend selection, default dtype and the seeded random generator."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import minigrad as mg
from minigrad import F, Tensor, nn
from minigrad import backend as B

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_backend_names_the_choices():
    with pytest.raises(mg.BackendError) as info:
        mg.set_backend("bogus")
    message = str(info.value)
    assert "'bogus'" in message and "'numpy'" in message and "'cupy'" in message
    assert mg.get_backend() == "numpy"  # a failed switch leaves the backend as it was
    assert B.xp is np


def test_cupy_missing_explains_how_to_install_it(cupy_unusable):
    with pytest.raises(mg.BackendError) as info:
        mg.set_backend("cupy")
    message = str(info.value)
    assert mg.get_backend() == "numpy" and B.xp is np
    if cupy_unusable == "not installed":
        assert 'pip install -e ".[cuda12]"' in message
        assert "cuda13" in message
    else:  # CuPy installed but no usable GPU
        assert "GPU" in message and "numpy" in message and "cudaErrorInsufficientDriver" in message


def test_get_backend(backend):
    assert mg.get_backend() == backend
    x = Tensor([1.0, 2.0])
    assert B.is_cupy_array(x.data) == (backend == "cupy")
    assert isinstance(x.numpy(), np.ndarray)
    np.testing.assert_array_equal(mg.to_numpy(x.data), [1.0, 2.0])


def test_numpy_is_the_default_backend():
    assert mg.get_backend() == "numpy"
    assert mg.get_default_dtype() == np.float32


def test_backend_switch_moves_arrays(backend):
    host = np.arange(6.0).reshape(2, 3)
    arr = B.asarray(host, dtype=np.float32)
    assert arr.dtype == np.float32 and B.is_cupy_array(arr) == (backend == "cupy")
    np.testing.assert_array_equal(mg.to_numpy(arr), host)
    lin = nn.Linear(3, 2)
    mg.set_backend("numpy")
    lin.to()  # parameters come back to the host with the backend
    assert isinstance(lin.weight.data, np.ndarray)


def test_default_dtype_applies_to_new_parameters():
    mg.set_default_dtype(np.float64)
    assert mg.get_default_dtype() == np.float64
    assert nn.Linear(2, 2).weight.dtype == np.float64
    assert nn.LayerNorm(2).weight.dtype == np.float64
    assert nn.Embedding(3, 2).weight.dtype == np.float64
    mg.set_default_dtype("float32")
    assert nn.Linear(2, 2).weight.dtype == np.float32


def test_manual_seed_reproducibility(backend):
    mg.manual_seed(123)
    a = mg.to_numpy(B.rng().normal((4, 5)))
    d1 = F.dropout(Tensor(np.ones((8, 8))), 0.5).numpy()
    mg.manual_seed(123)
    b = mg.to_numpy(B.rng().normal((4, 5)))
    d2 = F.dropout(Tensor(np.ones((8, 8))), 0.5).numpy()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(d1, d2)
    mg.manual_seed(124)
    c = mg.to_numpy(B.rng().normal((4, 5)))
    assert not np.allclose(a, c)
    assert abs(a.std() - 1.0) < 0.6 and a.dtype == np.float32
    u = mg.to_numpy(B.rng().random((1000,)))
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.05
    assert mg.to_numpy(B.rng().normal((3,), std=0.02, dtype=np.float64)).dtype == np.float64


def test_rng_state_round_trip(backend):
    mg.manual_seed(5)
    B.rng().normal((10,))  # advance a little first
    state = mg.get_rng_state()
    first = [mg.to_numpy(B.rng().normal((3, 3))), mg.to_numpy(B.rng().random((7,)))]
    mg.manual_seed(999)  # scramble
    B.rng().normal((100,))
    mg.set_rng_state(state)
    second = [mg.to_numpy(B.rng().normal((3, 3))), mg.to_numpy(B.rng().random((7,)))]
    for x, y in zip(first, second):
        np.testing.assert_array_equal(x, y)
    # the state is plain data (ints and dicts), so a checkpoint can store it as JSON
    assert mg.get_rng_state() == json.loads(json.dumps(mg.get_rng_state()))


def _run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_env_var_selects_backend():
    ok = _run_python("import minigrad; print(minigrad.get_backend())", MINIGRAD_BACKEND="numpy")
    assert ok.returncode == 0 and ok.stdout.strip() == "numpy"


def test_bogus_env_var_fails_clearly():
    """A bad MINIGRAD_BACKEND does not break `import minigrad` (so `--help` works); the first
    array op raises a BackendError naming the variable and the fix."""
    bad = _run_python("import minigrad; minigrad.tensor([1.0])", MINIGRAD_BACKEND="bogus")
    assert bad.returncode != 0
    assert "BackendError" in bad.stderr
    assert "MINIGRAD_BACKEND='bogus' is not a backend" in bad.stderr and "numpy" in bad.stderr
    assert _run_python("import minigrad", MINIGRAD_BACKEND="bogus").returncode == 0


@pytest.mark.parametrize("value, fragments", [
    ("cuda", ["MINIGRAD_BACKEND='cuda' is not a backend", "numpy", "unset it"]),
    ("cupy", ["MINIGRAD_BACKEND=cupy", "unset MINIGRAD_BACKEND"]),
])
def test_bad_env_backend_in_the_cli_is_one_line(tmp_path, value, fragments):
    """`MINIGRAD_BACKEND=cupy` without a usable GPU (CuPy missing here: a broken import) or a
    name that is no backend: --help still works; a command is one line, exit code 2."""
    env = {**os.environ, "MINIGRAD_BACKEND": value, "PYTHONPATH": str(REPO)}
    # no CuPy: a folder first on the path whose `cupy` cannot be imported
    (tmp_path / "cupy.py").write_text("raise ImportError('no CuPy here')\n")
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{REPO}"
    run = lambda *argv: subprocess.run([sys.executable, "-m", "gpt2", *argv], cwd=REPO, capture_output=True,  # noqa: E731
                                       text=True, timeout=120, env=env)
    assert run("--help").returncode == 0
    res = run("generate", "--checkpoint", str(tmp_path), "--prompt", "Hi")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "--backend" not in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("value", ["soon", "-3", "0"])
def test_bad_dist_timeout_in_the_cli_is_one_line(tmp_path, value):
    env = {**os.environ, "MINIGRAD_DIST_TIMEOUT": value, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "gpt2", "train", "--out", str(tmp_path / "o")], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env=env)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: MINIGRAD_DIST_TIMEOUT") and "unset it" in lines[0]


def test_no_init_draws_nothing_and_leaves_the_generator_alone():
    mg.manual_seed(7)
    expected = mg.nn.Linear(4, 3).weight.numpy()      # what the next draw should give
    mg.manual_seed(7)
    state = mg.get_rng_state()
    with mg.backend.no_init():
        skeleton = mg.nn.Linear(4, 3)
    assert mg.get_rng_state() == state
    w = skeleton.weight.numpy()
    assert w.shape == (3, 4) and np.all(w == w.flat[0])   # a constant placeholder, nothing random
    skeleton.load_state_dict({"weight": np.ones((3, 4)), "bias": np.zeros(3)})
    assert skeleton.weight.data.flags.writeable and skeleton.weight.numpy().sum() == 12
    np.testing.assert_array_equal(mg.nn.Linear(4, 3).weight.numpy(), expected)
