"""Prepared datasets: memory-mapped shards, seeded random windows, exact resume, rank slices,
damaged folders; gradient accumulation equals one bigger batch; the char tokenizer end to end
(train -> checkpoint -> generate), --keep-best."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from gpt2_helpers import PLAY, ByteTokenizer, char_dataset, tiny_model, tokenizer_or_skip

import gpt2.evaluate as evaluate_module
import minigrad as mg
from gpt2 import GPT2Error
from gpt2.checkpoint import load_checkpoint, load_tokenizer, save_checkpoint
from gpt2.cli import main
from gpt2.data import create_loaders
from gpt2.dataset import PreparedDataset, RandomWindows, is_prepared_dataset
from gpt2.evaluate import calc_loss_batch
from gpt2.prepare import MANIFEST
from gpt2.tokenizer import CharTokenizer
from gpt2.train import make_optimizer, train
from gpt2.train_extras import accumulate_gradients

TEXT = PLAY


@pytest.fixture
def char_ds(tmp_path):
    return char_dataset(tmp_path)


def test_dataset_opens_with_its_tokenizer(char_ds):
    ds = PreparedDataset(char_ds)
    assert is_prepared_dataset(char_ds) and ds.tokenizer == CharTokenizer.from_text(TEXT)
    assert ds.vocab_size == len(set(TEXT))
    assert ds.num_tokens("train") + ds.num_tokens("val") == len(TEXT)
    assert all(isinstance(s, np.memmap) for s in ds.shards["train"])   # read from disk, not loaded


def test_random_windows_are_real_windows_seeded_and_stateless(char_ds):
    ds = PreparedDataset(char_ds)
    train = ds.loader("train", batch_size=4, context_length=16, seed=5)
    corpus = TEXT[:ds.num_tokens("train")]
    x, y = train.get_batch(3)
    assert x.shape == y.shape == (4, 16) and x.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])                       # y is x shifted by one
    for row_x, row_y in zip(x, y):
        window = ds.tokenizer.decode(row_x) + ds.tokenizer.decode(row_y[-1:])
        assert window in corpus                                      # a real 17-character window
    again = ds.loader("train", batch_size=4, context_length=16, seed=5)
    assert np.array_equal(again.get_batch(3)[0], x)                 # batch i depends on (seed, i) only
    assert not np.array_equal(train.get_batch(4)[0], x)
    assert not np.array_equal(ds.loader("train", 4, 16, seed=6).get_batch(3)[0], x)
    assert not np.array_equal(ds.loader("val", 4, 16, seed=5).get_batch(3)[0], x)


def test_windows_never_cross_shards_and_reach_every_start():
    shards = [np.arange(0, 10, dtype=np.uint16), np.arange(100, 120, dtype=np.uint16)]
    loader = RandomWindows(shards, batch_size=64, context_length=4, seed=0)
    assert loader.num_windows == (10 - 4) + (20 - 4)
    starts = set()
    for i in range(20):
        x, y = loader.get_batch(i)
        full = np.concatenate([x, y[:, -1:]], axis=1)                # (B, T+1)
        assert np.all(np.diff(full, axis=1) == 1)                    # consecutive ids: one shard each
        starts.update(full[:, 0].tolist())
    assert starts == set(range(0, 6)) | set(range(100, 116))         # uniform over all 22 starts


def test_rank_slices_make_up_the_global_batch(char_ds):
    train = PreparedDataset(char_ds).loader("train", batch_size=8, context_length=8, seed=1)
    x, y = train.get_batch(7)
    parts = [train.get_batch(7, rank=r, world_size=4) for r in range(4)]
    assert np.array_equal(np.concatenate([p[0] for p in parts]), x)
    assert np.array_equal(np.concatenate([p[1] for p in parts]), y)
    with pytest.raises(GPT2Error, match="cannot be split evenly over 3 ranks"):
        train.get_batch(0, rank=0, world_size=3)


def test_loader_state_resumes_the_same_batches(char_ds):
    ds = PreparedDataset(char_ds)
    a = ds.loader("train", batch_size=3, context_length=8, seed=2)
    assert len(list(a)) == len(a) == (len(TEXT) * 9 // 10) // 24    # a nominal epoch: the split's tokens
    it = iter(a)                                                     # (iterating goes on with epoch 2)
    next(it), next(it)
    state = json.loads(json.dumps(a.state_dict()))                   # as a checkpoint stores it
    assert state["epoch"] == 1 and state["batch_index"] == 2
    expected = [next(it) for _ in range(3)]
    b = ds.loader("train", batch_size=3, context_length=8, seed=2)
    b.load_state_dict(state)
    for (xe, ye), (xb, yb) in zip(expected, b):
        assert np.array_equal(xe, xb) and np.array_equal(ye, yb)
    with pytest.raises(GPT2Error, match="different data or batch size"):
        ds.loader("train", batch_size=4, context_length=8, seed=2).load_state_dict(state)
    text_loader, _ = create_loaders(TEXT, batch_size=3, max_length=8, tokenizer=ByteTokenizer())
    with pytest.raises(GPT2Error, match="prepared dataset, not a text file"):
        text_loader.load_state_dict(state)


def test_eval_batches_are_fixed_by_their_key(char_ds):
    val = PreparedDataset(char_ds).loader("val", batch_size=2, context_length=8, seed=0)
    a = [x for x, _ in val.eval_batches(3, key=250)]
    b = [x for x, _ in val.eval_batches(3, key=250)]
    c = [x for x, _ in val.eval_batches(3, key=500)]
    assert all(np.array_equal(p, q) for p, q in zip(a, b)) and len(a) == 3
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))
    assert (val.epoch, val.batch_index) == (0, 0)                    # evaluation does not move it


@pytest.mark.parametrize("damage, fragment", [
    ("truncate", r"not 3,969 tokens long \(a partial copy\?\)"), ("manifest", "not valid JSON"),
    ("version", "format version 99"),
    ("vocab", "does not match its tokenizer"), ("missing", "manifest.json is missing"),
])
def test_damaged_datasets_are_one_clear_error(char_ds, damage, fragment):
    manifest = char_ds / MANIFEST
    m = json.loads(manifest.read_text())
    if damage == "truncate":
        shard = char_ds / "train-00000.bin"
        shard.write_bytes(shard.read_bytes()[:-2])
    elif damage == "manifest":
        manifest.write_text("{not json")
    elif damage == "version":
        manifest.write_text(json.dumps({**m, "format_version": 99}))
    elif damage == "vocab":
        manifest.write_text(json.dumps({**m, "vocab_size": 3}))
    else:
        manifest.unlink()
    with pytest.raises(GPT2Error, match=fragment):
        PreparedDataset(char_ds)


def test_char_tokenizer_round_trip_and_refusal():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == " dehlorw" and tok.vocab_size == 8 and tok.eot_id is None
    assert tok.encode("hello") == [3, 2, 4, 4, 5] and tok.decode([3, 2, 4, 4, 5]) == "hello"
    assert CharTokenizer(**{"chars": tok.to_dict()["chars"]}) == tok
    with pytest.raises(GPT2Error, match=r"2 character\(s\) outside this 8-character vocabulary \('!', 'H'\)"):
        tok.encode("Hello!")
    with pytest.raises(GPT2Error, match="sorted"):
        CharTokenizer("ba")


# ---------------------------------------------------------------------------------------------
# Gradient accumulation: N batches of B give the gradient of one batch of N*B
# ---------------------------------------------------------------------------------------------

def _grads(model):
    return {n: mg.to_numpy(p.grad).copy() for n, p in model.named_parameters()}


def test_accumulated_gradient_equals_the_bigger_batch(backend):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 64, size=(6, 16))
    y = rng.integers(0, 64, size=(6, 16))
    big = tiny_model(seed=1)
    loss_big = calc_loss_batch(x, y, big)
    loss_big.backward()
    small = tiny_model(seed=1)
    loss_acc = accumulate_gradients(small, [(x[:2], y[:2]), (x[2:4], y[2:4]), (x[4:], y[4:])])
    assert loss_acc == pytest.approx(loss_big.item(), rel=1e-6)
    g_big, g_acc = _grads(big), _grads(small)
    for name in g_big:
        np.testing.assert_allclose(g_acc[name], g_big[name], rtol=1e-4, atol=1e-7, err_msg=name)


def test_train_with_grad_accum_takes_the_bigger_batch_step(backend):
    """One train() step with --grad-accum 3 over batches of 2 (in order) leaves the gradient and
    the loss of one step over the batch of 6 made of the same windows."""
    def run(batch_size, grad_accum):
        model = tiny_model(seed=2, vocab_size=256, context_length=8)
        loader, val = create_loaders(TEXT, batch_size=batch_size, max_length=8, tokenizer=ByteTokenizer())
        loader.shuffle = False                                       # the same windows, in order
        opt = make_optimizer(model, lr=1e-3)
        h = train(model, loader, val, opt, max_steps=1, eval_every=1, eval_iter=1, progress=False,
                  sample_prompt=None, grad_accum=grad_accum)
        return _grads(model), h
    g_big, h_big = run(6, 1)
    g_acc, h_acc = run(2, 3)
    assert h_acc.tokens_seen == h_big.tokens_seen == [48]
    for name in g_big:
        np.testing.assert_allclose(g_acc[name], g_big[name], rtol=1e-4, atol=1e-7, err_msg=name)


# ---------------------------------------------------------------------------------------------
# The CLI on a prepared char dataset: train, exact resume, keep-best, generate
# ---------------------------------------------------------------------------------------------

RUN = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--context-length", "16", "--batch-size", "4",
       "--dropout", "0.1", "--qkv-bias", "--tie", "--init", "gpt2", "--lr", "3e-3", "--min-lr", "3e-4",
       "--warmup-steps", "3", "--beta2", "0.99", "--no-decay-all", "--grad-clip", "1.0", "--grad-accum", "2",
       "--eval-every", "4", "--eval-iters", "3", "--sample-prompt", "ROMEO:", "--no-progress", "--seed", "3"]


def _final_state(out):
    ckpt = load_checkpoint(out)
    weights = {n: mg.to_numpy(a).copy() for n, a in ckpt.model.state_dict().items()}
    moments = {k: np.asarray(v) for k, v in ckpt.optimizer_state["tensors"].items()}
    return weights, moments, ckpt.trainer_state


def test_cli_prepared_dataset_resume_is_exact(char_ds, tmp_path, capsys, monkeypatch):
    """Ctrl-C during step 5 of a run with random windows, accumulation, warmup + cosine and dropout;
    the resumed run ends bit-for-bit where the uninterrupted one does."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "--data", str(char_ds), *RUN, "--max-steps", "14", "--out", str(full)]) == 0
    out = capsys.readouterr().out
    assert "char tokenizer, vocabulary" in out and "of 2 accumulated batches" in out
    assert "(matrices only)" in out and "ms/step" in out
    real, calls = evaluate_module.calc_loss_batch, {"n": 0}

    def ctrl_c_in_step_5(x, y, model):
        if model.training:
            if calls["n"] == 10:                                     # 2 batches a step
                os.kill(os.getpid(), signal.SIGINT)
            calls["n"] += 1
        return real(x, y, model)

    monkeypatch.setattr(evaluate_module, "calc_loss_batch", ctrl_c_in_step_5)
    assert main(["train", "--data", str(char_ds), *RUN, "--max-steps", "14", "--out", str(part)]) == 130
    assert "stopped at step 6" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["train", "--resume", str(part)]) == 0
    wa, ma, sa = _final_state(full)
    wb, mb, sb = _final_state(part)
    for name in wa:
        assert np.array_equal(wa[name], wb[name]), name
    for name in ma:
        assert np.array_equal(ma[name], mb[name]), name
    assert sa["loader"] == sb["loader"] and sa["loader"]["kind"] == "random_windows"
    assert sa["rng_state"] == sb["rng_state"]
    keys = ("steps", "train_losses", "val_losses", "lrs", "tokens_seen")
    assert {k: sa["history"][k] for k in keys} == {k: sb["history"][k] for k in keys}
    assert sa["history"]["steps"] == [0, 4, 8, 12, 13]              # every 4 steps, and after the last


def test_cli_keep_best_and_generate_with_the_char_tokenizer(char_ds, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(char_ds), *RUN, "--max-steps", "12", "--out", str(out),
                 "--keep-best"]) == 0
    text = capsys.readouterr().out
    state = json.loads((out / "best" / "trainer_state.json").read_text())
    ckpt = load_checkpoint(out)
    history = ckpt.trainer_state["history"]
    assert state["val_loss"] == min(history["val_losses"]) == ckpt.trainer_state["best_val_loss"]
    assert f"best validation loss {state['val_loss']:.4f}" in text
    assert isinstance(load_tokenizer(out / "best"), CharTokenizer)
    assert (out / "latest").read_text().strip() == "ckpt-000012"
    # generate decodes with the checkpoint's own tokenizer, no flags needed
    assert main(["generate", "--checkpoint", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "20"]) == 0
    generated = capsys.readouterr().out.rstrip("\n")
    assert generated.startswith("ROMEO:") and len(generated) == len("ROMEO:") + 20
    assert set(generated) <= set(TEXT)
    # ... and refuses characters the vocabulary lacks, in one line
    assert main(["generate", "--checkpoint", str(out), "--prompt", "Zounds!"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "outside this" in err and "'Z'" in err and "\n" not in err
    # --keep-best never replaces a `best` that is already there
    assert main(["train", "--data", str(char_ds), *RUN, "--max-steps", "2", "--out", str(out)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_cli_bad_sample_prompt_for_a_char_dataset_is_caught_before_training(char_ds, tmp_path, capsys):
    argv = ["train", "--data", str(char_ds), *RUN, "--max-steps", "2", "--out", str(tmp_path / "o"),
            "--sample-prompt", "Zounds"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--sample-prompt" in err and "'Z'" in err and not (tmp_path / "o").exists()


def test_checkpoint_tokenizer_record(tmp_path):
    tokenizer_or_skip()   # an old checkpoint (no record) is read as GPT-2's BPE
    char = CharTokenizer.from_text("abcdefgh")
    model = tiny_model(vocab_size=8)
    save_checkpoint(tmp_path / "char", model, tokenizer=char)
    record = json.loads((tmp_path / "char" / "tokenizer.json").read_text())
    assert record == {"type": "char", "chars": "abcdefgh"}
    assert load_checkpoint(tmp_path / "char").tokenizer == char == load_tokenizer(tmp_path / "char")
    with pytest.raises(GPT2Error, match="has 65 tokens but the model's vocabulary is 8"):
        save_checkpoint(tmp_path / "bad", model, tokenizer=CharTokenizer("".join(
            chr(c) for c in range(40, 105))))
    (tmp_path / "char" / "tokenizer.json").write_text('{"type": "char", "chars": "abc"}')
    with pytest.raises(GPT2Error, match="describes 3 tokens"):
        load_checkpoint(tmp_path / "char")
    (tmp_path / "char" / "tokenizer.json").write_text('{"type": "wordpiece"}')
    with pytest.raises(GPT2Error, match="unknown tokenizer record"):
        load_checkpoint(tmp_path / "char")
    # A checkpoint from before tokenizers were recorded is GPT-2 BPE.
    save_checkpoint(tmp_path / "old", tiny_model(vocab_size=50257))
    assert not (tmp_path / "old" / "tokenizer.json").exists()
    assert load_checkpoint(tmp_path / "old").tokenizer is None
    assert load_tokenizer(tmp_path / "old").name == tokenizer_or_skip().name == "gpt2"
