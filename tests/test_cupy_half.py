"""The CuPy half end to end: the CLI with `--backend cupy`, bench, and how the two backends compare.

On machines without a GPU these run on the strict CPU stand-in (tests/cupy_standin); with a GPU,
on the real CuPy. How the backends compare, by design:
* random streams differ (CuPy's generator is not NumPy's), so the same seed gives *different*
  initial weights and dropout masks on the two backends;
* given the same weights, the same batches and no dropout, they compute the same losses and
  logits to float32 tolerance (not bit for bit: fused kernels and reductions round differently).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gpt2_helpers import ByteTokenizer, python_for, tiny_model, tokenizer_or_skip

import minigrad as mg
from gpt2.checkpoint import save_checkpoint
from gpt2.cli import bench, main
from gpt2.data import create_loaders
from gpt2.evaluate import calc_loss_batch
from gpt2.train import make_optimizer

REPO = Path(__file__).resolve().parent.parent
TEXT = "Every effort moves you closer to the end of the story, said Jack Gisburn. " * 6


def _weights_on(model, backend_name):
    """The same weights, moved to `backend_name`."""
    host = {k: mg.to_numpy(v).copy() for k, v in model.state_dict().items()}
    mg.set_backend(backend_name)
    model.load_state_dict(host)
    return model


def _train_losses(backend_name, steps=6):
    mg.set_backend("numpy")
    model = tiny_model(seed=4, vocab_size=256, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                       dropout=0.0)
    _weights_on(model, backend_name)
    loader, _ = create_loaders(TEXT, batch_size=2, max_length=16, seed=1, tokenizer=ByteTokenizer())
    opt = make_optimizer(model, lr=1e-2)
    losses = []
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        loss = calc_loss_batch(x, y, model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    weights = {k: mg.to_numpy(v) for k, v in model.state_dict().items()}
    mg.set_backend("numpy")
    return losses, weights


def test_same_weights_same_batches_same_losses_on_both_backends():
    cpu, cpu_w = _train_losses("numpy")
    gpu, gpu_w = _train_losses("cupy")
    assert cpu[-1] < cpu[0] - 0.5                     # it learns
    np.testing.assert_allclose(gpu, cpu, rtol=2e-5)
    # Weights to a looser tolerance: the key bias has a gradient of exactly 0 in exact arithmetic
    # (softmax ignores a constant per row), so AdamW's normalised step turns rounding noise into
    # updates of either sign there.
    for name in cpu_w:
        np.testing.assert_allclose(gpu_w[name], cpu_w[name], rtol=1e-3, atol=2e-4, err_msg=name)


def test_same_seed_gives_different_weights_on_the_two_backends():
    """Documented behaviour: the backends' generators differ, so seeds are per backend."""
    mg.set_backend("cupy")
    try:
        a = tiny_model(seed=1).tok_emb.weight.numpy()
        b = tiny_model(seed=1).tok_emb.weight.numpy()
    finally:
        mg.set_backend("numpy")
    c = tiny_model(seed=1).tok_emb.weight.numpy()
    np.testing.assert_array_equal(a, b)               # reproducible on one backend
    assert not np.allclose(a, c)                      # but not across backends
    assert abs(a.std() - 0.02) < 0.003                # GPT-2's init on both


@pytest.fixture
def checkpoint(tmp_path):
    tokenizer_or_skip()
    model = tiny_model(seed=2, vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=1)
    save_checkpoint(tmp_path / "ckpt", model)
    return tmp_path / "ckpt"


@pytest.mark.parametrize("cache", [True, False])
def test_cli_generate_on_cupy_equals_numpy(checkpoint, capsys, cache):
    """Greedy decoding from the same checkpoint: the same text on both backends."""
    texts = {}
    for name in ("numpy", "cupy"):
        argv = ["generate", "--checkpoint", str(checkpoint), "--prompt", "Every effort moves",
                "--max-new-tokens", "8", "--backend", name] + ([] if cache else ["--no-cache"])
        assert main(argv) == 0
        texts[name] = capsys.readouterr().out
    assert texts["cupy"] == texts["numpy"] and texts["cupy"].startswith("Every effort moves")


def test_cli_train_on_cupy(tmp_path, capsys):
    tokenizer_or_skip()
    story = tmp_path / "story.txt"
    story.write_text(TEXT * 4)
    argv = ["train", "--data", str(story), "--n-layers", "1", "--n-heads", "2", "--emb-dim", "16",
            "--context-length", "16", "--max-steps", "6", "--eval-every", "3", "--eval-iter", "1",
            "--sample-prompt", "Every", "--backend", "cupy", "--out", str(tmp_path / "run"),
            "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Ep 1 (Step 000000)" in out
    assert (tmp_path / "run" / "latest").exists()


def test_bench_on_cupy_reports_the_device():
    """`bench --backend cupy`'s work (a 64x64 matmul for the rate: the default 4096 is a GPU's size)."""
    try:
        res = bench.bench(bench.GPTConfig(vocab_size=97, context_length=8, emb_dim=16, n_heads=2, n_layers=1),
                          batch_size=1, steps=2, warmup=1, backend_name="cupy", gen_tokens=3, gen_runs=1,
                          matmul_size=64)
    finally:
        mg.set_backend("numpy")
    assert res["backend"] == "cupy" and res["tokens_per_s"] > 0 and "peak_gpu_pool_mib" in res
    assert res["generate"]["same_tokens_cache_vs_no_cache"] is True
    assert "CuPy pool" in bench.format_report(res)
    if os.environ.get("MINIGRAD_TEST_CUPY") == "standin":
        assert "stand-in" in res["device"]


def test_the_cli_in_a_real_process_on_cupy(checkpoint):
    """`python -m gpt2 generate --backend cupy` as a user runs it (through the stand-in's runner
    where there is no GPU)."""
    result = subprocess.run([*python_for("cupy"), "-m", "gpt2", "generate", "--checkpoint", str(checkpoint),
                             "--prompt", "Hello", "--max-new-tokens", "4", "--backend", "cupy"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("Hello")
