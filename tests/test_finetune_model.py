"""What a fine-tuned model is, recorded so that it reloads (gpt2/config.py, gpt2/finetune/adapt.py):
a classifier head and unmerged LoRA in config.json, checkpoints that give back the same logits,
freezing, DPO's stacked batches, and train()'s eval_fn / History.metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gpt2_helpers import ByteTokenizer, tiny_model

import minigrad as mg
from gpt2 import GPT2Error, GPTConfig, GPTModel
from gpt2.checkpoint import load_checkpoint, load_model, save_checkpoint
from gpt2.data import DataLoader
from gpt2.evaluate import Evaluation
from gpt2.finetune import (
    PreferenceDataset,
    add_classifier_head,
    add_lora,
    classification_loss,
    dpo_batch_loss,
    dpo_stacked_loss,
    freeze,
    frozen_copy,
    merge_lora_into,
    set_dropout,
    weights_sha256,
    with_template,
)
from gpt2.finetune.classify_data import LabelledTokens
from gpt2.tokenizer import CharTokenizer
from gpt2.train import History, make_optimizer, train
from minigrad import no_grad

RNG = np.random.default_rng(11)


def _classifier_with_lora(targets="all", seed=3):
    model = tiny_model(seed=seed, tie_embeddings=True)
    add_classifier_head(model, 2)
    add_lora(model, rank=4, alpha=8, targets=targets)
    freeze(model, "lora")
    return model


def _ids(B=4, T=8, vocab=64):
    return RNG.integers(0, vocab, size=(B, T)).astype(np.int64)


def test_a_plain_config_is_written_as_before_and_old_ones_load():
    config = GPTConfig()
    assert set(config.to_dict()) == {"vocab_size", "context_length", "emb_dim", "n_heads", "n_layers",
                                     "dropout", "qkv_bias", "tie_embeddings"}
    assert GPTConfig.from_dict(config.to_dict()) == config
    assert config.num_classes is None and config.lora_rank is None and config.lora_targets == ()


def test_config_counts_the_classifier_head_and_lora():
    C, L = 16, 2
    base = GPTConfig(vocab_size=64, context_length=16, emb_dim=C, n_heads=2, n_layers=L)
    clf = base.replace(num_classes=3)
    assert clf.num_parameters() == base.num_parameters() + C * 3 + 3          # tied LM head had none
    lora = clf.replace(lora_rank=4, lora_alpha=8.0, lora_targets=("attn.qkv", "head"))
    assert lora.num_parameters() == clf.num_parameters() + 4 * (L * (C + 3 * C) + (C + 3))
    for config in (clf, lora):
        assert GPTModel(config).num_parameters() == config.num_parameters()
        assert GPTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(GPT2Error, match="num_classes"):
        base.replace(num_classes=1)
    with pytest.raises(GPT2Error, match="lora_targets"):
        base.replace(lora_rank=4, lora_alpha=4.0, lora_targets=("mlp.gate",))
    with pytest.raises(GPT2Error, match="tied"):
        base.replace(lora_rank=4, lora_alpha=4.0, lora_targets=("head",))
    with pytest.raises(GPT2Error, match="lora_alpha"):
        base.replace(lora_rank=4, lora_targets=("mlp.fc",))


def test_a_classifier_with_lora_reloads_with_the_same_logits(tmp_path, backend):
    """The unmerged LoRA checkpoint of a classifier: config.json says what it is, and load_model
    builds the same layers, so the logits are bit for bit the same (and training resumes)."""
    model = _classifier_with_lora()
    optimizer = make_optimizer(model, lr=1e-2)
    ids, labels = _ids(), np.array([0, 1, 1, 0])
    for _ in range(3):                                   # B moves off zero: LoRA changes the output
        optimizer.zero_grad()
        classification_loss(model, ids, labels).backward()
        optimizer.step()
    assert float(np.abs(mg.to_numpy(model.blocks[0].mlp.fc.lora_B.data)).max()) > 0
    save_checkpoint(tmp_path / "ckpt", model, optimizer, {"step": 3})
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["num_classes"] == 2 and saved["lora_rank"] == 4 and saved["lora_alpha"] == 8.0
    assert saved["lora_targets"] == ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "head"]
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.config == model.config and sorted(ckpt.model.state_dict()) == sorted(model.state_dict())
    model.eval()
    with no_grad():
        np.testing.assert_array_equal(ckpt.model(ids).numpy(), model(ids).numpy())
    assert ckpt.model(ids).shape == (4, 8, 2)
    freeze(ckpt.model, "lora")            # the resumed run's optimizer has the same groups and moments
    make_optimizer(ckpt.model, lr=1e-2).load_state_dict(ckpt.optimizer_state)

    merged = load_model(tmp_path / "ckpt")
    merge_lora_into(merged)
    assert merged.config.lora_rank is None and merged.config.num_classes == 2
    with no_grad():
        np.testing.assert_allclose(merged(ids).numpy(), model(ids).numpy(), rtol=1e-4, atol=1e-5)
    assert merged.num_parameters() == merged.config.num_parameters()


@pytest.mark.parametrize("field, value", [("num_classes", 1), ("num_classes", "2"), ("lora_rank", 0),
                                          ("lora_alpha", -1), ("lora_alpha", "big"), ("lora_targets", "all"),
                                          ("lora_targets", ["mlp.gate"])])
def test_bad_fine_tuning_fields_in_config_json_are_one_line_errors(tmp_path, field, value):
    model = _classifier_with_lora()
    save_checkpoint(tmp_path / "c", model)
    path = tmp_path / "c" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with pytest.raises(GPT2Error, match=field) as info:
        load_model(tmp_path / "c")
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_what_trains():
    model = tiny_model(seed=1, tie_embeddings=True)
    add_classifier_head(model, 2)
    freeze(model, "last-block")
    names = {n for n, _ in model.named_trainable_parameters()}
    assert names and all(n.startswith(("blocks.1.", "ln_f.", "head.")) for n in names)
    assert {"head.weight", "head.bias", "ln_f.weight"} <= names
    freeze(model, "all")
    assert len(names) < len(model.trainable_parameters()) == len(model.parameters())
    with pytest.raises(GPT2Error, match="LoRA"):
        freeze(model, "lora")
    add_lora(model, rank=2, alpha=2)                     # "blocks": the head stays a plain layer ...
    freeze(model, "lora")
    names = {n for n, _ in model.named_trainable_parameters()}
    assert {"head.weight", "head.bias"} <= names         # ... and trains whole: it is new
    assert all(".lora_" in n or n.startswith("head.") for n in names)
    lm = tiny_model(seed=1)
    add_lora(lm, rank=2, alpha=2, targets="all")         # an untied LM head is adapted; nothing else trains
    freeze(lm, "lora")
    assert all(".lora_" in n for n, _ in lm.named_trainable_parameters())
    assert "head.lora_A" in dict(lm.named_trainable_parameters())
    with pytest.raises(GPT2Error, match="unknown LoRA target"):
        add_lora(tiny_model(), rank=2, alpha=2, targets="mlp.gate")


def test_set_dropout_and_the_frozen_reference():
    model = tiny_model(seed=2, dropout=0.1)
    set_dropout(model, 0.0)
    assert model.config.dropout == 0.0 and model.blocks[0].attn.dropout_p == 0.0 and model.drop.p == 0.0
    reference = frozen_copy(model)
    assert weights_sha256(reference) == weights_sha256(model) and not reference.training
    assert all(not p.requires_grad for p in reference.parameters())
    model.tok_emb.weight.data = model.tok_emb.weight.data + 1
    assert weights_sha256(reference) != weights_sha256(model)


def test_a_templated_tokenizer_records_its_template():
    char = with_template(CharTokenizer("ab"), "alpaca")
    assert char.to_dict() == {"type": "char", "chars": "ab", "prompt_template": "alpaca"}
    assert char.encode("ab") == [0, 1] and char.vocab_size == 2
    assert with_template(char, None) is char


def test_stacked_dpo_batches_are_the_two_passes(backend):
    tok = ByteTokenizer()
    entries = [{"instruction": "Say hi", "input": "", "chosen": "Hello!", "rejected": "Go away."},
               {"instruction": "Add", "input": "2+2", "chosen": "4, gladly.", "rejected": "4. Obviously."}]
    chosen, rejected = PreferenceDataset(entries, tok, pad_id=0).batch(np.arange(2))
    ids, mask = PreferenceDataset(entries, tok, pad_id=0, stacked=True).batch(np.arange(2))
    assert ids.shape == (4, chosen.ids.shape[1])
    np.testing.assert_array_equal(ids, np.concatenate([chosen.ids, rejected.ids]))
    policy = tiny_model(seed=1, vocab_size=256, context_length=256)
    reference = frozen_copy(policy)
    stacked = dpo_stacked_loss(policy, reference, ids, mask, beta=0.1)
    assert stacked.loss.item() == pytest.approx(np.log(2.0), abs=1e-6) and stacked.reward_margin == 0.0
    other = tiny_model(seed=2, vocab_size=256, context_length=256)
    a, b = dpo_stacked_loss(other, reference, ids, mask), dpo_batch_loss(other, reference, chosen, rejected)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-5)
    assert a.reward_margin == pytest.approx(b.reward_margin, rel=1e-4, abs=1e-6)


def test_train_records_what_eval_fn_measures(capsys):
    """eval_fn replaces the evaluation: its losses are printed and recorded, its metrics kept in
    History.metrics and its text appended to the log line."""
    ids = RNG.integers(0, 7, size=(16, 6)).astype(np.int64)
    labels = (ids == 3).any(axis=1).astype(np.int64)
    loader = DataLoader(LabelledTokens(ids, labels), 8, shuffle=True, drop_last=True, seed=1)
    model = tiny_model(seed=4)
    add_classifier_head(model, 2)
    calls = []

    def eval_fn(model, train_loader, val_loader, eval_iter, key):
        calls.append((key, model.training))
        return Evaluation(1.5, 2.5, {"accuracy": 0.75}, ", Accuracy 75%")

    history = train(model, loader, loader, make_optimizer(model, lr=1e-3), epochs=2, eval_every=2,
                    progress=False, sample_prompt=None, eval_fn=eval_fn,
                    loss_fn=lambda x, y, m: classification_loss(m, x, y))
    out = capsys.readouterr().out
    assert calls == [(0, True), (2, True)]
    assert history.val_losses == [2.5, 2.5] and history.metric("accuracy") == [0.75, 0.75]
    assert "Train loss 1.500, Val loss 2.500, Accuracy 75%, Tokens seen 48" in out
    old = {k: v for k, v in history.to_dict().items() if k != "metrics"}   # saved before metrics existed
    assert History.from_dict(old).metrics == [{}, {}]
    assert History.from_dict(history.to_dict()).metrics == history.metrics
    with pytest.raises(ValueError, match="metrics"):
        History.from_dict({**history.to_dict(), "metrics": [{"a": "b"}]})
