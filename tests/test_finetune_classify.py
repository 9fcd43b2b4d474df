"""GPT-2 as a classifier (gpt2.finetune.classify): head, freezing, last-token loss, accuracy, and
the LoRA variant (the book's appendix E), on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
from gpt2_helpers import tiny_model

import minigrad as mg
from gpt2.finetune import (
    add_classifier_head,
    classification_loader,
    classification_loss,
    evaluate_classifier,
    freeze_for_classification,
    last_token_logits,
)
from gpt2.finetune.classify_data import LabelledTokens
from minigrad import optim
from minigrad.lora import apply_lora

RNG = np.random.default_rng(6)


def toy_split(n=16, T=6):
    """Label 1 when the sequence contains token 7: something the last position can learn."""
    ids = RNG.integers(0, 7, size=(n, T))
    labels = RNG.integers(0, 2, size=n)
    ids[labels == 1, RNG.integers(0, T)] = 7
    return LabelledTokens(ids.astype(np.int64), labels.astype(np.int64))


def test_classifier_head_and_the_books_freezing(backend):
    model = tiny_model()
    head = add_classifier_head(model, num_classes=2)
    assert model.head is head and head.weight.shape == (2, 16) and head.bias is not None
    freeze_for_classification(model)
    names = [n for n, _ in model.named_trainable_parameters()]
    assert names and all(n.startswith(("blocks.1.", "ln_f.", "head.")) for n in names)
    assert {"head.weight", "head.bias", "ln_f.weight", "blocks.1.mlp.fc.weight"} <= set(names)
    split = toy_split()
    ids, labels = split.batch(np.arange(4))
    logits = last_token_logits(model, ids)
    assert logits.shape == (4, 2)
    np.testing.assert_allclose(logits.numpy(), model(ids).numpy()[:, -1, :], rtol=1e-5, atol=1e-6)
    classification_loss(model, ids, labels).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in names), name


def test_training_the_classifier_lowers_the_loss_and_evaluate_restores_the_mode(backend):
    model = tiny_model(seed=2)
    add_classifier_head(model)
    freeze_for_classification(model)
    split = toy_split()
    loader = classification_loader(split, 8, shuffle=True, drop_last=True)
    before, acc = evaluate_classifier(model, classification_loader(split, 8))
    assert 0.0 <= acc <= 1.0 and model.training
    opt = optim.AdamW(model.trainable_parameters(), lr=3e-3, weight_decay=0.1)
    for _ in range(10):
        for ids, labels in loader:
            opt.zero_grad()
            classification_loss(model, ids, labels).backward()
            opt.step()
    after, _ = evaluate_classifier(model, classification_loader(split, 8), max_batches=2)
    assert after < before
    model.eval()
    evaluate_classifier(model, classification_loader(split, 8))
    assert not model.training


def test_the_lora_variant_trains_only_the_low_rank_updates(backend):
    mg.manual_seed(123)
    model = tiny_model()
    add_classifier_head(model)
    model.requires_grad_(False)
    apply_lora(model, rank=4, alpha=8)
    trainable = [n for n, _ in model.named_trainable_parameters()]
    assert trainable and all(".lora_" in n for n in trainable) and "head.lora_B" in trainable
    ids, labels = toy_split().batch(np.arange(8))
    classification_loss(model, ids, labels).backward()
    assert all(p.grad is not None for _, p in model.named_trainable_parameters())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    with pytest.raises(ValueError):
        optim.AdamW([p for p in model.parameters() if not p.requires_grad])
