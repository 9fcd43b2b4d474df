"""benchmarks/: the PyTorch references run their --help without torch, say clearly when torch is
missing, and (where torch is installed; it is not a dependency) compute what our engine computes.

Nothing here times anything; the default suite needs neither torch nor transformers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = ["torch_train_step.py", "hf_generate.py", "same_run.py", "ops_side_by_side.py"]
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=BENCH.parent)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_runs_without_torch(script):
    done = _run(BENCH / script, "--help")
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout and "torch" in done.stdout


@pytest.mark.skipif(HAVE_TORCH, reason="torch is installed here; this checks the message without it")
@pytest.mark.parametrize("script, args", [("torch_train_step.py", ["--steps", "1"]),
                                          ("hf_generate.py", ["--runs", "1"]),
                                          ("ops_side_by_side.py", ["--repeats", "1"])])
def test_missing_torch_is_a_clear_error(script, args):
    done = _run(BENCH / script, *args)
    assert done.returncode == 2
    assert "needs PyTorch" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed (optional: the bench-torch extra)")
def test_torch_reference_loads_our_weights_and_gives_our_loss(tmp_path):
    # The same model in both engines: our initial weights and batch give PyTorch the same loss.
    from safetensors.numpy import save_file

    from gpt2 import GPTConfig, GPTModel
    from minigrad import functional as F

    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2,
                    dropout=0.0, qkv_bias=False, tie_embeddings=False)
    model = GPTModel(cfg)
    save_file({k: np.ascontiguousarray(v) for k, v in model.state_dict().items()},
              str(tmp_path / "w.safetensors"))
    batch = np.random.default_rng(0).integers(0, 97, (1, 2, 17))
    np.save(tmp_path / "b.npy", batch)
    ours = F.cross_entropy(model(batch[0, :, :-1]), batch[0, :, 1:]).item()
    done = _run(BENCH / "torch_train_step.py", "--vocab", 97, "--ctx", 16, "--emb", 32, "--heads", 2,
                "--layers", 2, "--batch", 2, "--dropout", 0, "--threads", 1, "--json",
                "--init-from", tmp_path / "w.safetensors", "--batches", tmp_path / "b.npy")
    assert done.returncode == 0, done.stderr
    theirs = json.loads(done.stdout.strip().splitlines()[-1])["losses"][0]
    assert abs(theirs - ours) < 1e-5


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed (optional: the bench-torch extra)")
def test_ops_side_by_side_times_every_op_on_both_sides():
    done = _run(BENCH / "ops_side_by_side.py", "--batch", 2, "--ctx", 8, "--emb", 16, "--heads", 2,
                "--layers", 1, "--repeats", 2, "--threads", 1, "--json", timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    names = [r["op"] for r in result["ops"]]
    assert len(names) == 5 * 3 + 4 * 2 + 2       # 5 linears x 3 matmuls, 4 ops x 2, AdamW, step
    assert all(r["ours_us"] > 0 and r["torch_us"] > 0 for r in result["ops"])
    # the NumPy twins timed beside the Numba loops where those are in use (not the matmuls)
    twins = [r["twin_us"] for r in result["ops"] if r["twin_us"] is not None]
    assert len(twins) == (4 * 2 + 2 if result["cpu_kernels"] == "numba" else 0)
