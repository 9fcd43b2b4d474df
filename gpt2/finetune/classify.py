"""Turning GPT-2 into a classifier (the book's chapter 6): a new head, what to freeze, the loss
on the last token, and accuracy.

    model = load_pretrained(...)                     # any GPTModel
    add_classifier_head(model, num_classes=2)        # head: Linear(C, 2), new and trainable
    freeze_for_classification(model)                 # train only: last block, final norm, head
    opt = AdamW(model.trainable_parameters(), lr=5e-5, weight_decay=0.1)
    loss = classification_loss(model, ids, labels)   # cross-entropy of the last token's logits
    loss_value, accuracy = evaluate_classifier(model, loader)

Why the last token: attention is causal, so the last position is the only one whose output has
seen the whole message. (With padding at the end, that is a padding token's position; it still
sees every real token, and the fine-tuned model learns to use it, as in the book.)
"""

from __future__ import annotations

import numpy as np

from minigrad import F, nn, no_grad
from minigrad.tensor import Tensor

from ..errors import GPT2Error
from ..evaluate import Evaluation


def add_classifier_head(model, num_classes: int = 2):
    """Replace the model's output head by a fresh Linear(emb_dim, num_classes) with a bias (the
    book's `model.out_head`, PyTorch's initialisation from minigrad's seeded generator); returns
    it. The model then outputs (B, T, num_classes) logits, and its config says so
    (`num_classes`), so a checkpoint of it reloads as the classifier it is."""
    config = model.config
    if config.lora_rank is not None and "head" in config.lora_targets:
        raise GPT2Error("the model's head carries LoRA; add the classifier head before LoRA")
    config = config.replace(num_classes=num_classes)   # (checks num_classes)
    head = nn.Linear(config.emb_dim, num_classes)
    head.to(model.tok_emb.weight.dtype)
    model.head = head
    model.config = config
    return head


def freeze_for_classification(model, last_blocks: int = 1):
    """Freeze everything but the last `last_blocks` transformer blocks, the final layer norm and
    the head (the book's choice: the last block is enough to adapt, and much cheaper to train)."""
    model.requires_grad_(False)
    for block in list(model.blocks)[len(model.blocks) - last_blocks:]:
        block.requires_grad_(True)
    model.ln_f.requires_grad_(True)
    model.head.requires_grad_(True)
    return model


def last_token_logits(model, ids) -> Tensor:
    """(B, num_classes): the head's output at the last position only (`last_only` runs the final
    norm and head for that position alone)."""
    logits = model(ids, last_only=True)                       # (B, 1, num_classes)
    return logits.reshape(logits.shape[0], logits.shape[-1])


def classification_loss(model, ids, labels) -> Tensor:
    """Mean cross-entropy of the last token's logits against the labels (B,)."""
    return F.cross_entropy(last_token_logits(model, ids), labels)


def evaluate_classifier(model, loader, max_batches: int | None = None) -> tuple[float, float]:
    """(mean loss, accuracy) over a loader's batches (the first `max_batches`, if given), in eval
    mode and without a graph; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    losses, correct, seen = [], 0, 0
    try:
        with no_grad():
            for i, (ids, labels) in enumerate(loader.batches()):
                if max_batches is not None and i >= max_batches:
                    break
                logits = last_token_logits(model, ids)
                losses.append(F.cross_entropy(logits, labels).item())
                predicted = np.argmax(logits.numpy(), axis=-1)
                correct += int((predicted == np.asarray(labels)).sum())
                seen += len(labels)
    finally:
        model.train(was_training)
    if not seen:
        return float("nan"), float("nan")
    return float(np.mean(losses)), correct / seen


def classification_evaluation(model, train_loader, val_loader, eval_iter: int | None, key: int = 0
                              ) -> Evaluation:
    """What gpt2.train.train evaluates every eval_every steps for a classifier (its `eval_fn`):
    the loss of `eval_iter` batches of each loader, as the book prints, and their accuracy, from
    the same logits, recorded in the history for the accuracy plot."""
    train_loss, train_acc = evaluate_classifier(model, train_loader, eval_iter)
    val_loss, val_acc = evaluate_classifier(model, val_loader, eval_iter)
    return Evaluation(train_loss, val_loss, {"train_accuracy": train_acc, "val_accuracy": val_acc})


def classify_text(model, tokenizer, text: str, max_length: int, pad_id: int = 50256
                  ) -> tuple[int, np.ndarray]:
    """The class of one text and the probabilities of all classes (the book's classify_review):
    its tokens cut to `max_length` and padded to it with `pad_id`, as the training messages were
    (the SMS data: 120 tokens), through the classifier."""
    ids = tokenizer.encode(text)[:min(max_length, model.config.context_length)]
    ids = np.array([ids + [pad_id] * (max_length - len(ids))], dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            logits = last_token_logits(model, ids).numpy()[0].astype(np.float64)
    finally:
        model.train(was_training)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    return int(np.argmax(probs)), probs
