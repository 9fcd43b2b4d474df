"""Training that survives: exact resume, crash-safe run directories, Ctrl-C, kill -9, NaN guard.

The central promise: a run interrupted at step k (Ctrl-C, SIGTERM, kill -9, --max-steps) and
resumed with `train --resume DIR` ends with exactly the losses and bit-for-bit the weights and
optimizer moments of the run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gpt2_helpers import ByteTokenizer, tiny_model, tokenizer_or_skip

import gpt2.evaluate as evaluate_module
import gpt2.train_extras as extras_module
import minigrad as mg
from gpt2 import GPT2Error
from gpt2.checkpoint import (
    LATEST_FILE,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from gpt2.cli import main
from gpt2.data import create_loaders
from gpt2.resume import restore_training
from gpt2.run_dir import save_run_checkpoint
from gpt2.train import History, NonFiniteError, TrainConfig, TrainState, make_optimizer, train

REPO = Path(__file__).resolve().parent.parent
CKPT_FILES = ["config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"]
CLI_CKPT_FILES = sorted([*CKPT_FILES, "tokenizer.json"])   # `train` also records its tokenizer

# A short synthetic text; bytes are the tokens (vocabulary 256).
WORDS = "the a cat dog sat ran on under mat tree quickly slowly red big".split()
TEXT = " ".join(random.Random(0).choice(WORDS) for _ in range(220)) + "."

STORY = ("I HAD always thought Jack Gisburn rather a cheap genius--though a good fellow enough--so it was "
         "no great surprise to me to hear that, in the height of his glory, he had dropped his painting, "
         "married a rich widow, and established himself in a villa on the Riviera. ") * 6

# A tiny CLI run (GPT-2's vocabulary, so the head dominates: ~1.6M parameters). 20 batches per epoch,
# dropout on (the random generator matters), clipping; WARMUP adds warmup + cosine decay (the
# schedule's length is --max-steps, so runs compared with it share their --max-steps).
TINY_RUN = ["--n-layers", "2", "--n-heads", "2", "--emb-dim", "16", "--context-length", "8",
            "--dropout", "0.1", "--epochs", "3", "--lr", "2e-3", "--grad-clip", "1.0", "--eval-every", "3",
            "--eval-iter", "1", "--sample-prompt", "", "--no-progress", "--seed", "7"]
WARMUP = ["--warmup-steps", "3"]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _setup(seed=3):
    model = tiny_model(seed=seed, vocab_size=256, context_length=8, emb_dim=16, n_heads=2, n_layers=2,
                       dropout=0.1)
    train_loader, val_loader = create_loaders(TEXT, batch_size=2, max_length=8, seed=seed,
                                              tokenizer=ByteTokenizer())
    return model, train_loader, val_loader


CFG = TrainConfig(epochs=2, eval_every=4, eval_iter=2, warmup_steps=3, grad_clip=1.0, progress=False,
                  sample_prompt="the", sample_tokens=4)


def _snapshot(state, loader, history):
    return {"step": state.step, "epoch": state.epoch, "tokens_seen": state.tokens_seen,
            "skipped_steps": state.skipped_steps, "loader": loader.state_dict(), "history": history.to_dict()}


def _weights(model):
    return {n: mg.to_numpy(a).copy() for n, a in model.state_dict().items()}


def _assert_equal_arrays(a: dict, b: dict):
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def _losses(history: dict) -> dict:
    return {k: history[k] for k in ("steps", "epochs", "tokens_seen", "train_losses", "val_losses", "lrs")}


def _final(out):
    """(weights, optimizer moments, history) of the latest checkpoint in run directory `out`."""
    ckpt = load_checkpoint(out)
    moments = {k: np.asarray(v) for k, v in ckpt.optimizer_state["tensors"].items()}
    return _weights(ckpt.model), moments, ckpt.trainer_state


def _assert_same_run(out_a, out_b):
    wa, ma, sa = _final(out_a)
    wb, mb, sb = _final(out_b)
    _assert_equal_arrays(wa, wb)
    _assert_equal_arrays(ma, mb)
    assert sa["optimizer"] == sb["optimizer"] and sa["rng_state"] == sb["rng_state"]
    assert (sa["step"], sa["epoch"], sa["tokens_seen"], sa["loader"]) == \
        (sb["step"], sb["epoch"], sb["tokens_seen"], sb["loader"])
    assert _losses(sa["history"]) == _losses(sb["history"])


@pytest.fixture
def story(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text(STORY, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _no_slow_saves(monkeypatch):
    monkeypatch.delenv("GPT2_TEST_SAVE_DELAY", raising=False)


def _signal_at_step(monkeypatch, step: int, sig=signal.SIGINT):
    """Deliver `sig` to this process during training step `step` (once), as a user's Ctrl-C would."""
    real = evaluate_module.calc_loss_batch
    calls = {"n": 0}

    def wrapped(x, y, model):
        if model.training:           # not the evaluations, which call it in eval mode
            if calls["n"] == step:
                os.kill(os.getpid(), sig)
            calls["n"] += 1
        return real(x, y, model)

    monkeypatch.setattr(evaluate_module, "calc_loss_batch", wrapped)


# ---------------------------------------------------------------------------------------------
# exact resume, through files, in the library
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 6, "epoch end", 70])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, k, backend):
    """Train N steps in one go; separately train k steps, save a checkpoint, throw every object
    away, reload it into fresh ones and train to N: same losses, bit-identical weights and moments."""
    model, train_loader, val_loader = _setup()
    opt = make_optimizer(model, lr=3e-3)
    full = train(model, train_loader, val_loader, opt, CFG, tokenizer=ByteTokenizer())
    rng_after = mg.get_rng_state()
    n = 2 * len(train_loader)
    k = len(train_loader) if k == "epoch end" else k
    assert k < n

    model2, train2, val2 = _setup()
    opt2 = make_optimizer(model2, lr=3e-3)
    state, history = TrainState(), History()
    train(model2, train2, val2, opt2, CFG, tokenizer=ByteTokenizer(), state=state, history=history,
          hooks=[lambda st: st.step >= k])
    assert state.step == k
    run = save_run_checkpoint(tmp_path / "run", model2, opt2, _snapshot(state, train2, history), step=k)
    del model2, opt2, train2, val2, history

    mg.manual_seed(12345)                         # whatever the generator did in between
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.path == run and run.name == f"ckpt-{k:06d}"
    _, train3, val3 = _setup()
    opt3 = make_optimizer(ckpt.model, lr=99.0)    # every hyper-parameter comes from the checkpoint
    state3, history3 = restore_training(ckpt, opt3, train3)
    assert state3.step == k and opt3.param_groups[0]["initial_lr"] == 3e-3
    train(ckpt.model, train3, val3, opt3, CFG, tokenizer=ByteTokenizer(), state=state3, history=history3)

    _assert_equal_arrays(_weights(model), _weights(ckpt.model))
    for st_a, st_b in zip(opt.state, opt3.state):
        _assert_equal_arrays({k_: mg.to_numpy(v) for k_, v in st_a.items()},
                             {k_: mg.to_numpy(v) for k_, v in st_b.items()})
    assert opt.step_count == opt3.step_count == n
    assert _losses(history3.to_dict()) == _losses(full.to_dict())
    assert mg.get_rng_state() == rng_after                 # the dropout generator, too


def test_restore_refuses_what_cannot_be_resumed(tmp_path):
    model, train_loader, _ = _setup()
    save_checkpoint(tmp_path / "model-only", model)
    ckpt = load_checkpoint(tmp_path / "model-only")
    with pytest.raises(GPT2Error, match="cannot be resumed"):
        restore_training(ckpt, make_optimizer(model), train_loader)
    opt = make_optimizer(model)
    save_run_checkpoint(tmp_path / "run", model, opt, {"step": 0, "loader": train_loader.state_dict()},
                        step=0)
    ckpt = load_checkpoint(tmp_path / "run")
    other_loader, _ = create_loaders(TEXT + TEXT, batch_size=2, max_length=8, tokenizer=ByteTokenizer())
    with pytest.raises(GPT2Error, match="different data"):
        restore_training(ckpt, make_optimizer(ckpt.model), other_loader)
    small = tiny_model(vocab_size=256, context_length=8, emb_dim=16, n_heads=2, n_layers=1)
    with pytest.raises(GPT2Error, match="does not match"):
        restore_training(ckpt, make_optimizer(small), train_loader)


# ---------------------------------------------------------------------------------------------
# run directories: atomic checkpoints, `latest`, --keep
# ---------------------------------------------------------------------------------------------

def test_run_directory_keeps_the_newest_and_points_latest_at_it(tmp_path):
    model = tiny_model()
    opt = make_optimizer(model)
    run = tmp_path / "run"
    for step in (5, 10, 15, 20):
        path = save_run_checkpoint(run, model, opt, {"step": step}, step=step, keep=2)
        assert (run / LATEST_FILE).read_text().strip() == path.name
        assert latest_checkpoint(run) == path
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-000015", "ckpt-000020", "latest"]
    assert sorted(p.name for p in (run / "ckpt-000020").iterdir()) == CKPT_FILES
    assert load_checkpoint(run).trainer_state["step"] == 20          # a run directory loads its latest
    assert load_model(run / "ckpt-000015").config == model.config   # and any one checkpoint in it
    # The same step again replaces it; keep=1 leaves only it.
    save_run_checkpoint(run, model, opt, {"step": 20, "note": "again"}, step=20, keep=1)
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-000020"]
    assert load_checkpoint(run).trainer_state["note"] == "again"
    for bad in (dict(step=-1), dict(step=1.5), dict(step=1, keep=0)):
        with pytest.raises(GPT2Error):
            save_run_checkpoint(run, model, opt, **bad)


def test_leftovers_of_a_killed_save_are_ignored_then_cleaned(tmp_path):
    model = tiny_model()
    run = tmp_path / "run"
    save_run_checkpoint(run, model, step=1)
    # What kill -9 leaves mid-save: a half-written hidden directory (and maybe a temporary file).
    half = run / ".tmp-ckpt-000002-abc"
    half.mkdir()
    (half / "config.json").write_text("{}")
    (half / ".model.safetensors.x.tmp").write_bytes(b"\x00" * 10)
    assert latest_checkpoint(run).name == "ckpt-000001"
    assert load_model(run).config == model.config
    save_run_checkpoint(run, model, step=2)
    assert not half.exists() and not list(run.glob(".*"))


def test_latest_pointer_lost_or_lagging(tmp_path):
    model = tiny_model()
    run = tmp_path / "run"
    save_run_checkpoint(run, model, step=1)
    save_run_checkpoint(run, model, step=2)
    (run / LATEST_FILE).write_text("ckpt-000001\n")   # a crash between the rename and moving `latest`
    assert latest_checkpoint(run).name == "ckpt-000002"
    (run / LATEST_FILE).write_bytes(b"\xff\x00garbage")
    assert latest_checkpoint(run).name == "ckpt-000002"
    (run / LATEST_FILE).unlink()
    assert load_checkpoint(run).path.name == "ckpt-000002"
    empty = tmp_path / "empty-run"
    (empty / ".tmp-ckpt-000001-x").mkdir(parents=True)   # killed during its very first save
    with pytest.raises(GPT2Error, match="without a complete checkpoint"):
        load_model(empty)


def test_a_diverged_model_is_never_saved(tmp_path):
    model = tiny_model()
    opt = make_optimizer(model)
    good = save_run_checkpoint(tmp_path, model, opt, {"step": 1}, step=1)
    model.blocks[0].mlp.fc.weight.data[0, 0] = np.nan
    with pytest.raises(GPT2Error, match=r"blocks\.0\.mlp\.fc\.weight contains NaN"):
        save_run_checkpoint(tmp_path, model, opt, {"step": 2}, step=2)
    assert latest_checkpoint(tmp_path) == good and not list(tmp_path.glob(".tmp*"))


# ---------------------------------------------------------------------------------------------
# the CLI: --resume, --save-every, --keep, Ctrl-C
# ---------------------------------------------------------------------------------------------

def _train(story, out, *extra):
    return main(["train", "--data", str(story), *TINY_RUN, "--out", str(out), *extra])


def test_cli_resume_after_max_steps_is_exact(tmp_path, story, capsys, backend):
    """On both backends: the CLI's --resume continues bit for bit (`--backend cupy` on CuPy)."""
    tokenizer_or_skip()
    on = ["--backend", backend]
    # Constant lr (no WARMUP): here the two runs differ in --max-steps, the schedule's length.
    assert _train(story, tmp_path / "full", "--max-steps", "23", *on) == 0
    assert _train(story, tmp_path / "part", "--max-steps", "9", "--save-every", "4", "--keep", "5", *on) == 0
    assert [p.name for p in list_checkpoints(tmp_path / "part")] == ["ckpt-000004", "ckpt-000008",
                                                                     "ckpt-000009"]
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "part"), "--max-steps", "23", "--keep", "2", *on]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "ckpt-000009 at step 9" in out and "--max-steps 23 (was 9)" in out
    _assert_same_run(tmp_path / "full", tmp_path / "part")
    # --keep 2 from the resumed command on: the newest two remain.
    assert [p.name for p in list_checkpoints(tmp_path / "part")] == ["ckpt-000020", "ckpt-000023"]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_saves_and_resume_is_exact(tmp_path, story, capsys, monkeypatch, sig, code):
    """A signal at step 11 (mid-epoch, warmup + cosine, dropout): the step finishes, a checkpoint is
    saved, the exit code says so, the message says how to resume; resuming ends identically."""
    tokenizer_or_skip()
    assert _train(story, tmp_path / "full", *WARMUP, "--max-steps", "26") == 0
    _signal_at_step(monkeypatch, 11, sig)
    assert _train(story, tmp_path / "part", *WARMUP, "--max-steps", "26") == code
    err = capsys.readouterr().err
    assert f"stopped at step 12 and saved {tmp_path / 'part' / 'ckpt-000012'}" in err
    assert f"resume with: python -m gpt2 train --resume {tmp_path / 'part'}" in err
    assert "Traceback" not in err
    monkeypatch.undo()
    assert main(["train", "--resume", str(tmp_path / "part")]) == 0
    _assert_same_run(tmp_path / "full", tmp_path / "part")


def test_save_every_and_final_save(tmp_path, story):
    tokenizer_or_skip()
    assert _train(story, tmp_path / "run", "--max-steps", "10", "--save-every", "5", "--keep", "9") == 0
    names = [p.name for p in list_checkpoints(tmp_path / "run")]
    assert names == ["ckpt-000005", "ckpt-000010"]
    state = json.loads((tmp_path / "run" / "ckpt-000010" / "trainer_state.json").read_text())
    assert state["step"] == 10 and state["run"]["save_every"] == 5 and len(state["data_sha256"]) == 64
    # Resuming a finished run trains nothing and changes nothing.
    before = _final(tmp_path / "run")
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == names
    after = _final(tmp_path / "run")
    _assert_equal_arrays(before[0], after[0])
    assert before[2]["step"] == after[2]["step"] == 10


def test_cli_resume_errors(tmp_path, story, capsys):
    tokenizer_or_skip()
    run = tmp_path / "run"
    assert _train(story, run, "--max-steps", "4", "--save-every", "2", "--keep", "5") == 0
    capsys.readouterr()

    def error(argv, *fragments):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
        for f in fragments:
            assert f in err, (f, err)

    error(["train", "--resume", str(tmp_path / "nope")], "does not exist")
    error(["train", "--resume", str(run), "--batch-size", "4"], "--batch-size 4 differs", "(2)")
    error(["train", "--resume", str(run), "--emb-dim", "32"], "--emb-dim 32 differs")
    error(["train", "--resume", str(run), "--overwrite"], "--overwrite")
    error(["train", "--resume", str(run / "ckpt-000002")], "after step 2", "ckpt-000004", "--out")
    error(["train", "--data", str(story), *TINY_RUN, "--out", str(run)], "already holds", f"--resume {run}")
    other = tmp_path / "other.txt"
    other.write_text(STORY.replace("Jack", "Jill"), encoding="utf-8")
    error(["train", "--resume", str(run), "--data", str(other)], "not the text", "SHA-256")
    save_checkpoint(tmp_path / "model-only", tiny_model(vocab_size=50257))
    error(["train", "--resume", str(tmp_path / "model-only")], "cannot be resumed")
    # From an older checkpoint into a new directory is fine.
    assert main(["train", "--resume", str(run / "ckpt-000002"), "--out", str(tmp_path / "branch")]) == 0
    assert latest_checkpoint(tmp_path / "branch").name == "ckpt-000004"
    # --overwrite replaces the old run's checkpoints.
    assert _train(story, run, "--max-steps", "1", "--overwrite") == 0
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-000001"]


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, story, capsys, monkeypatch):
    tokenizer_or_skip()
    import gpt2.safeio as safeio

    real = safeio.write_safetensors
    calls = {"n": 0}

    def disk_full(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:                     # two files per save: the second save's model
            raise OSError(28, "No space left on device")
        return real(path, tensors, metadata)

    monkeypatch.setattr(safeio, "write_safetensors", disk_full)
    run = tmp_path / "run"
    assert _train(story, run, "--max-steps", "10", "--save-every", "2") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not save the checkpoint of step 4" in err, err
    assert "No space left on device" in err and f"{run / 'ckpt-000002'}, is intact" in err
    assert latest_checkpoint(run).name == "ckpt-000002" and not list(run.glob(".tmp*"))


# ---------------------------------------------------------------------------------------------
# NaN guard
# ---------------------------------------------------------------------------------------------

def _nan_loss_at(monkeypatch, steps):
    real = evaluate_module.calc_loss_batch
    calls = {"n": 0}

    def wrapped(x, y, model):
        loss = real(x, y, model)
        if model.training:
            calls["n"] += 1
            if calls["n"] - 1 in steps:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(evaluate_module, "calc_loss_batch", wrapped)


def test_nan_loss_stops_naming_the_step_without_applying_it(monkeypatch):
    model, train_loader, val_loader = _setup()
    _nan_loss_at(monkeypatch, {5})
    state = TrainState()
    before = {}

    def remember(st):
        before.update(_weights(model))

    with pytest.raises(NonFiniteError, match="loss became nan at step 5.*lower --lr.*--skip-nonfinite") as e:
        train(model, train_loader, val_loader, make_optimizer(model), CFG, state=state, hooks=[remember])
    assert e.value.step == 5 and state.step == 5
    _assert_equal_arrays(before, _weights(model))          # the bad update was not applied


def test_nan_gradient_stops_and_skip_nonfinite_goes_on(monkeypatch):
    model, train_loader, val_loader = _setup()
    real = extras_module.clip_grad_norm_
    calls = {"n": 0}

    def clip(params, max_norm):
        calls["n"] += 1
        norm = real(params, max_norm)
        return float("inf") if calls["n"] in (3, 4) else norm

    monkeypatch.setattr(extras_module, "clip_grad_norm_", clip)
    with pytest.raises(NonFiniteError, match="gradient norm became inf at step 2"):
        train(model, train_loader, val_loader, make_optimizer(model), CFG)

    calls["n"] = 0
    model, train_loader, val_loader = _setup()
    opt = make_optimizer(model)
    state = TrainState()
    logs = []
    train(model, train_loader, val_loader, opt, CFG, state=state, skip_nonfinite=True, log=logs.append)
    n = 2 * len(train_loader)
    assert state.step == n and state.skipped_steps == 2 and opt.step_count == n - 2
    assert sum("skipped" in line for line in logs) == 2
    assert all(np.isfinite(mg.to_numpy(p.data)).all() for p in model.parameters())


def test_cli_nan_keeps_the_last_good_checkpoint(tmp_path, story, capsys, monkeypatch):
    tokenizer_or_skip()
    _nan_loss_at(monkeypatch, {5})
    run = tmp_path / "run"
    assert _train(story, run, "--max-steps", "20", "--save-every", "2") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the loss became nan at step 5"), err
    assert f"last good checkpoint, {run / 'ckpt-000004'}, is kept" in err and f"--resume {run}" in err
    assert latest_checkpoint(run).name == "ckpt-000004"
    load_checkpoint(run)                                     # and it loads

    monkeypatch.undo()
    _nan_loss_at(monkeypatch, {5, 6})
    assert _train(story, tmp_path / "skip", "--max-steps", "10", "--skip-nonfinite") == 0
    out = capsys.readouterr().out
    assert "step 5: the loss became nan; step skipped" in out
    state = load_checkpoint(tmp_path / "skip").trainer_state
    assert state["step"] == 10 and state["skipped_steps"] == 2 and state["optimizer"]["step"] == 8


# ---------------------------------------------------------------------------------------------
# real processes: SIGINT and kill -9
# ---------------------------------------------------------------------------------------------

def _popen(tmp_path, argv, delay=None, log="log"):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("GPT2_TEST_SAVE_DELAY", None)
    if delay:
        env["GPT2_TEST_SAVE_DELAY"] = str(delay)
    out = open(tmp_path / f"{log}.out", "w")   # noqa: SIM115 - closed by the caller via the process
    err = open(tmp_path / f"{log}.err", "w")   # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "gpt2", "train", *argv], cwd=tmp_path, env=env,
                            stdout=out, stderr=err)
    proc._files = (out, err)
    return proc


def _finish(proc, timeout=60):
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in proc._files:
            f.close()


def _wait_for(predicate, proc, timeout=60.0):
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            return False
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.005)
    return True


def _assert_loadable(run: Path):
    """What must hold after any crash: `latest` (if written yet) names a complete checkpoint, and
    the newest complete checkpoint loads with everything a resume needs."""
    complete = {p.name for p in list_checkpoints(run)}
    if (run / LATEST_FILE).exists():
        assert (run / LATEST_FILE).read_text().strip() in complete
    ckpt = load_checkpoint(run)
    assert sorted(p.name for p in ckpt.path.iterdir()) == CLI_CKPT_FILES
    assert ckpt.trainer_state["step"] == int(ckpt.path.name.split("-")[1])
    restore_training(ckpt, make_optimizer(ckpt.model))
    return ckpt


def test_real_ctrl_c_saves_and_says_how_to_resume(tmp_path, story):
    tokenizer_or_skip()
    run = tmp_path / "run"
    args = ["--data", str(story), *TINY_RUN, *WARMUP, "--max-steps", "22", "--save-every", "2",
            "--out", str(run)]
    proc = _popen(tmp_path, args, delay=0.15)
    try:
        assert _wait_for(lambda: bool(list_checkpoints(run)), proc), "finished before the first save"
        proc.send_signal(signal.SIGINT)
    finally:
        code = _finish(proc)
    err = (tmp_path / "log.err").read_text()
    assert code == 130, err
    assert f"resume with: python -m gpt2 train --resume {run}" in err and "Traceback" not in err
    ckpt = _assert_loadable(run)
    assert 2 <= ckpt.trainer_state["step"] < 22
    # Finishing it in this process gives exactly the run that was never interrupted.
    assert main(["train", "--resume", str(run)]) == 0
    assert _train(story, tmp_path / "full", *WARMUP, "--max-steps", "22") == 0
    _assert_same_run(tmp_path / "full", run)


def test_kill_9_at_any_moment_leaves_a_loadable_checkpoint(tmp_path, story):
    """kill -9 a real training process: once in the middle of writing a checkpoint (saves are
    slowed down so there is a middle), then at random moments of resumed runs. Each time the
    latest checkpoint loads complete; the last resume finishes the run exactly as if never killed."""
    tokenizer_or_skip()
    run = tmp_path / "run"
    new = ["--data", str(story), *TINY_RUN, *WARMUP, "--max-steps", "30", "--save-every", "1", "--keep", "2",
           "--out", str(run)]
    rng = random.Random(5)
    mid_save = 0
    for trial in range(3):
        argv = new if trial == 0 else ["--resume", str(run), "--no-progress"]
        proc = _popen(tmp_path, argv, delay=0.04, log=f"trial{trial}")
        try:
            if trial == 0:   # wait until a checkpoint exists and the next one is half written
                _wait_for(lambda: list_checkpoints(run) and list(run.glob(".tmp-ckpt-*/model.safetensors")),
                          proc)
            else:
                time.sleep(rng.uniform(0.3, 2.5))
            proc.kill()
        finally:
            _finish(proc)
        mid_save += bool(list(run.glob(".tmp-ckpt-*")))
        _assert_loadable(run)
    assert mid_save >= 1          # at least one kill landed mid-save
    assert main(["train", "--resume", str(run)]) == 0
    assert not list(run.glob(".tmp-*")) and not list(run.glob(".trash-*"))
    assert _train(story, tmp_path / "full", *WARMUP, "--max-steps", "30") == 0
    _assert_same_run(tmp_path / "full", run)
