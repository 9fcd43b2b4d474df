"""What a run really uses, not only what it prints: the learning rate and clipping the optimizer
applies after a resume that changes them, the schedule's horizon when --max-steps cuts a run
short, GPT-2's scaled init of the projections into the residual stream, and evaluation batches
apart from the batch just trained on. (Every rank's own dropout stream: tests/test_distributed.py.)

Each test watches the value where it is used (the optimizer's step, the clipping call, the
weights, the loss function's inputs), so it fails on the bug it names."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gpt2_helpers import PLAY, char_dataset, tiny_model

import gpt2.evaluate as evaluate_module
import gpt2.train_extras as extras_module
from gpt2.cli import main
from gpt2.dataset import PreparedDataset
from gpt2.train import make_optimizer, train
from minigrad.optim import AdamW, WarmupCosine

TEXT = PLAY

RUN = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--context-length", "16", "--batch-size", "2",
       "--dropout", "0", "--eval-every", "100", "--eval-iters", "1", "--sample-prompt", "", "--no-progress",
       "--seed", "3", "--save-every", "2"]


@pytest.fixture
def char_ds(tmp_path):
    return char_dataset(tmp_path)


@pytest.fixture
def applied_lrs(monkeypatch):
    """The learning rate of every AdamW update, read inside the update itself."""
    lrs = []
    real = AdamW.step

    def step(self):
        lrs.append(self.param_groups[0]["lr"])
        return real(self)

    monkeypatch.setattr(AdamW, "step", step)
    return lrs


def test_resume_applies_a_changed_constant_lr(char_ds, tmp_path, applied_lrs, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(char_ds), *RUN, "--max-steps", "4", "--out", str(out)]) == 0
    assert applied_lrs == [4e-4] * 4
    applied_lrs.clear()
    assert main(["train", "--resume", str(out), "--lr", "1e-4", "--max-steps", "7"]) == 0
    assert "--lr 0.0001 (was 0.0004)" in capsys.readouterr().out
    assert applied_lrs == [1e-4] * 3


def test_resume_applies_a_changed_peak_lr_to_the_schedule(char_ds, tmp_path, applied_lrs):
    out = tmp_path / "run"
    flags = ["--warmup-steps", "2", "--min-lr", "1e-5"]
    assert main(["train", "--data", str(char_ds), *RUN, *flags, "--max-steps", "4", "--out", str(out)]) == 0
    applied_lrs.clear()
    assert main(["train", "--resume", str(out), "--lr", "2e-4", "--max-steps", "8"]) == 0
    # The new peak from here on, the run's own warmup and floor, over the new horizon of 8 steps.
    schedule = WarmupCosine(max_lr=2e-4, warmup_steps=2, total_steps=7, min_lr=1e-5)
    np.testing.assert_allclose(applied_lrs, [schedule(s) for s in range(4, 8)], rtol=1e-12)
    assert applied_lrs[-1] == 1e-5


def test_resume_applies_a_changed_grad_clip(char_ds, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", "--data", str(char_ds), *RUN, "--grad-clip", "1.0", "--max-steps", "2",
                 "--out", str(out)]) == 0
    clips, real = [], extras_module.clip_grad_norm_

    def clip(params, max_norm):
        clips.append(max_norm)
        return real(params, max_norm)

    monkeypatch.setattr(extras_module, "clip_grad_norm_", clip)
    assert main(["train", "--resume", str(out), "--grad-clip", "0.25", "--max-steps", "4"]) == 0
    assert clips == [0.25, 0.25]


def test_max_steps_is_the_schedules_horizon(char_ds, tmp_path, applied_lrs, capsys):
    """10 epochs would be many more steps; --max-steps 6 ends the cosine on the floor at step 6."""
    out = tmp_path / "run"
    assert main(["train", "--data", str(char_ds), *RUN, "--warmup-steps", "2", "--lr", "1e-3",
                 "--min-lr", "1e-4", "--max-steps", "6", "--out", str(out)]) == 0
    assert "training: 6 steps" in capsys.readouterr().out
    assert len(applied_lrs) == 6
    assert applied_lrs[0] == 5e-4 and applied_lrs[1] == applied_lrs[2] == 1e-3   # warmup, the peak
    assert all(a > b for a, b in zip(applied_lrs[2:], applied_lrs[3:]))          # decaying all the way
    assert applied_lrs[-1] == 1e-4                                               # to the floor


def test_projections_into_the_residual_stream_start_with_the_scaled_std():
    """GPT-2's init: normal(0, 0.02), but 0.02 / sqrt(2 n_layers) for the two projections each
    block adds into the residual stream (attention's output, the MLP's down-projection)."""
    n_layers = 8
    model = tiny_model(seed=1, vocab_size=512, context_length=64, emb_dim=64, n_heads=4, n_layers=n_layers)
    scaled = 0.02 / math.sqrt(2 * n_layers)
    seen = set()
    for name, p in model.named_parameters():
        if name.endswith("bias") or ".ln" in name or name.startswith("ln"):
            continue
        want = scaled if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else 0.02
        std = float(np.std(p.numpy()))
        assert std == pytest.approx(want, rel=0.06), name
        seen.add(name.split(".", 2)[-1] if name.startswith("blocks.") else name)
    assert {"attn.proj.weight", "mlp.proj.weight", "attn.qkv.weight", "mlp.fc.weight", "tok_emb.weight",
            "pos_emb.weight"} <= seen


def test_evaluation_batches_are_not_the_batch_just_trained_on(char_ds):
    """A prepared dataset's evaluations draw their own random windows (a stream apart from
    training's), never the windows of the step just taken."""
    ds = PreparedDataset(char_ds)
    train_loader = ds.loader("train", batch_size=2, context_length=16, seed=3)
    val_loader = ds.loader("val", batch_size=2, context_length=16, seed=3)
    model = tiny_model(seed=0, vocab_size=ds.tokenizer.vocab_size, context_length=16, dropout=0.0)
    trained, evaluated = [], []   # evaluated[i]: the batches of the evaluation after step i

    def loss_fn(x, y, model):
        if model.training:
            trained.append(x.tobytes())
            evaluated.append([])
        else:
            evaluated[-1].append(x.tobytes())
        return evaluate_module.calc_loss_batch(x, y, model)

    train(model, train_loader, val_loader, make_optimizer(model), epochs=1, max_steps=6, eval_every=1,
          eval_iter=3, progress=False, sample_prompt=None, loss_fn=loss_fn)
    assert len(trained) == 6 and all(len(e) == 6 for e in evaluated)   # 3 train-split, then 3 val
    for step, (x, evals) in enumerate(zip(trained, evaluated)):
        assert x not in evals[:3], f"step {step}: evaluated on the batch it had just trained on"
    assert len({e for evals in evaluated for e in evals[:3]}) == 18   # and fresh batches every time
