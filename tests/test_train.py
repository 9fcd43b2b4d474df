"""gpt2.train and gpt2.plot: the loop's printout, evaluation, schedule, clipping, resuming."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from gpt2_helpers import ByteTokenizer, tiny_model

import minigrad as mg
from gpt2 import GPT2Error
from gpt2.data import create_loaders
from gpt2.evaluate import calc_loss_batch, calc_loss_loader
from gpt2.model import init_model_, pytorch_default_init_
from gpt2.plot import plot_losses
from gpt2.train import History, TrainConfig, TrainState, make_optimizer, train
from minigrad.optim import WarmupCosine

# Every test here runs on NumPy and on CuPy (a real GPU, or the strict CPU stand-in).
pytestmark = pytest.mark.usefixtures("backend")

# A short made-up text; bytes are the tokens (vocabulary 256).
TEXT = ("Every effort moves you closer to the end of the story. " * 3 +
        "Jack Gisburn had given up painting, and married a rich widow. ") * 2


def _setup(seed=0, dropout=0.0, batch_size=2, max_length=16, **model_kw):
    model = tiny_model(seed=seed, vocab_size=256, context_length=max_length, emb_dim=32, n_heads=2,
                       n_layers=2, dropout=dropout, **model_kw)
    train_loader, val_loader = create_loaders(TEXT, batch_size=batch_size, max_length=max_length, seed=seed,
                                              tokenizer=ByteTokenizer())
    return model, train_loader, val_loader


def _quiet(**kw):
    return TrainConfig(progress=False, sample_prompt=None, **kw)


def test_calc_loss_loader_and_batch():
    model, train_loader, val_loader = _setup()
    x, y = next(val_loader.batches())
    batch_loss = calc_loss_batch(x, y, model).item()
    assert abs(batch_loss - math.log(256)) < 0.3                     # untrained: about uniform
    n = len(val_loader)
    all_batches = [calc_loss_batch(x, y, model).item() for x, y in val_loader.batches()]
    assert calc_loss_loader(val_loader, model) == pytest.approx(np.mean(all_batches))
    assert calc_loss_loader(val_loader, model, num_batches=1) == pytest.approx(all_batches[0])
    assert calc_loss_loader(val_loader, model, num_batches=100) == pytest.approx(np.mean(all_batches[:n]))
    assert calc_loss_loader(list(val_loader.batches()), model) == pytest.approx(np.mean(all_batches))
    assert math.isnan(calc_loss_loader([], model))
    before = train_loader.state_dict()
    calc_loss_loader(train_loader, model, 2)
    assert train_loader.state_dict() == before                       # evaluation does not move it


def test_train_prints_like_the_book_and_records_history(capsys):
    model, train_loader, val_loader = _setup()
    opt = make_optimizer(model, lr=1e-3)
    history = train(model, train_loader, val_loader, opt, epochs=2, eval_every=3, eval_iter=2,
                    progress=False, sample_prompt="Every effort", sample_tokens=5, tokenizer=ByteTokenizer())
    out = capsys.readouterr().out.splitlines()
    evals = [line for line in out if line.startswith("Ep ")]
    steps_per_epoch = len(train_loader)
    total = 2 * steps_per_epoch
    assert history.steps == list(range(0, total, 3))
    assert len(evals) == len(history.steps)
    assert re.fullmatch(r"Ep 1 \(Step 000000\): Train loss \d+\.\d{3}, Val loss \d+\.\d{3}, "
                        r"Tokens seen 32, \d+\.\d ms/step, [\d,]+ tokens/s", evals[0])
    assert evals[-1].startswith(f"Ep 2 (Step {history.steps[-1]:06d})")
    assert history.tokens_seen == [(s + 1) * 2 * 16 for s in history.steps]
    assert history.epochs[-1] == pytest.approx((history.steps[-1] + 1) / steps_per_epoch)
    assert len(history.samples) == 2 and all(s.startswith("Every effort") for s in history.samples)
    assert sum(line.startswith("Every effort") for line in out) == 2     # a sample after each epoch
    assert history.train_losses[-1] < history.train_losses[0]
    assert History.from_dict(history.to_dict()) == history


def test_max_steps_stops_mid_epoch():
    model, train_loader, val_loader = _setup()
    state = TrainState()
    history = train(model, train_loader, val_loader, make_optimizer(model), _quiet(epochs=5, max_steps=4),
                    state=state)
    assert state.step == 4 and state.tokens_seen == 4 * 2 * 16
    assert train_loader.epoch == 0 and train_loader.batch_index == 4
    assert history.steps == [0]


def test_warmup_cosine_schedule_and_clipping():
    model, train_loader, val_loader = _setup()
    opt = make_optimizer(model, lr=1e-3)
    n = 2 * len(train_loader)
    history = train(model, train_loader, val_loader, opt, _quiet(epochs=2, eval_every=1, warmup_steps=3,
                                                                 grad_clip=0.5))
    sched = WarmupCosine(max_lr=1e-3, warmup_steps=3, total_steps=n - 1, min_lr=1e-4)
    np.testing.assert_allclose(history.lrs, [sched(s) for s in range(n)])
    assert history.lrs[0] < history.lrs[2] and history.lrs[-1] < history.lrs[3]
    assert history.lrs[-1] == 1e-4                                   # the last step is on the floor
    assert opt.param_groups[0]["initial_lr"] == 1e-3


def test_non_finite_loss_is_a_clear_error():
    model, train_loader, val_loader = _setup()
    model.tok_emb.weight.data[:] = np.nan
    with pytest.raises(GPT2Error, match="lower --lr"):
        train(model, train_loader, val_loader, make_optimizer(model), _quiet(epochs=1))


def test_make_optimizer_weight_decay_groups():
    model = tiny_model()
    book = make_optimizer(model, weight_decay=0.1)
    assert len(book.param_groups) == 1 and book.param_groups[0]["weight_decay"] == 0.1
    gpt2 = make_optimizer(model, weight_decay=0.1, decay_all=False)
    decayed, kept = gpt2.param_groups
    assert all(p.ndim == 2 for p in decayed["params"]) and kept["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in kept["params"])
    with pytest.raises(GPT2Error, match="learning rate"):
        make_optimizer(model, lr=-1.0)
    with pytest.raises(GPT2Error, match="weight decay"):
        make_optimizer(model, weight_decay=-0.1)


def test_bad_train_config():
    for bad in (dict(epochs=0), dict(eval_every=-1), dict(grad_clip=0.0), dict(warmup_steps=-1),
                dict(max_steps=0)):
        with pytest.raises(GPT2Error):
            TrainConfig(**bad)


def test_resumed_run_matches_an_uninterrupted_one():
    """Stopping after some steps and continuing with the same objects (state, history, loader,
    optimizer, generator) gives bit-identical weights: the pieces a checkpoint must save suffice."""
    cfg = _quiet(epochs=2, eval_every=2, warmup_steps=2)
    model, train_loader, val_loader = _setup(dropout=0.1)
    mg.manual_seed(1)
    full = train(model, train_loader, val_loader, make_optimizer(model, lr=2e-3), cfg)

    model2, train2, val2 = _setup(dropout=0.1)
    opt2 = make_optimizer(model2, lr=2e-3)
    mg.manual_seed(1)
    state, history = TrainState(), History()

    class Crash(Exception):
        pass

    def crash_after_5(st):
        if st.step == 5:
            raise Crash

    with pytest.raises(Crash):
        train(model2, train2, val2, opt2, cfg, state=state, history=history, hooks=[crash_after_5])
    # Round-trip what a checkpoint would hold through fresh objects.
    loader_state, opt_state, rng = train2.state_dict(), opt2.state_dict(), mg.get_rng_state()
    _, train3, val3 = _setup(dropout=0.1)
    train3.load_state_dict(loader_state)
    opt3 = make_optimizer(model2, lr=123.0)
    opt3.load_state_dict(opt_state)
    mg.manual_seed(77)
    mg.set_rng_state(rng)
    train(model2, train3, val3, opt3, cfg, state=state, history=history)
    for (name, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy(), err_msg=name)
    assert history.steps == full.steps and history.train_losses == full.train_losses


def test_loss_plot(tmp_path):
    history = History(steps=[0, 5, 10], epochs=[0.1, 0.6, 1.1], tokens_seen=[512, 3072, 5632],
                      train_losses=[9.8, 7.0, 6.0], val_losses=[9.9, 7.5, 6.8])
    path = plot_losses(history, tmp_path / "sub" / "loss.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(GPT2Error, match="no evaluations"):
        plot_losses(History(), tmp_path / "empty.png")


def test_pytorch_default_init_is_the_books_starting_point():
    model = tiny_model(vocab_size=256, emb_dim=64, n_heads=4, n_layers=2, context_length=32)
    mg.manual_seed(5)
    pytorch_default_init_(model)
    tok = model.tok_emb.weight.numpy()
    assert abs(tok.std() - 1.0) < 0.03 and abs(tok.mean()) < 0.03          # Embedding: normal(0, 1)
    for layer, fan_in in ((model.blocks[0].mlp.fc, 64), (model.blocks[0].mlp.proj, 256), (model.head, 64)):
        bound = 1 / np.sqrt(fan_in)          # Linear: uniform(+-1/sqrt(fan_in))
        w = layer.weight.numpy()
        assert np.abs(w).max() <= bound and abs(w.std() - bound / np.sqrt(3)) < 0.1 * bound
        if layer.bias is not None:
            assert np.abs(layer.bias.numpy()).max() <= bound and np.abs(layer.bias.numpy()).max() > 0
    assert (model.blocks[1].ln2.weight.numpy() == 1).all() and (model.ln_f.bias.numpy() == 0).all()
    assert all(p.dtype == np.float32 for p in model.parameters())
    again = tiny_model(vocab_size=256, emb_dim=64, n_heads=4, n_layers=2, context_length=32)
    mg.manual_seed(5)
    init_model_(again, "book")
    for (name, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy(), err_msg=name)           # seeded: reproducible
    before = again.tok_emb.weight.numpy().copy()
    init_model_(again, "gpt2")                                                # GPTModel's own: unchanged
    np.testing.assert_array_equal(again.tok_emb.weight.numpy(), before)
    with pytest.raises(GPT2Error, match="unknown init"):
        init_model_(again, "xavier")
