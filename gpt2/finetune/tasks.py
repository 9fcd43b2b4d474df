"""The book's three fine-tuning tasks, on the training loop of pretraining (gpt2.train.train).

A task turns a model and GPT-2's tokenizer into what train() takes -- the loaders, the loss
(`loss_fn(*batch, model)`), the evaluation (`eval_fn`), hooks, the prompt sampled after each
epoch -- and says what to do when training ends (`finish`: the final numbers, the plots, the
test-set responses):

    model = load_pretrained("gpt2")                          # or load_model("runs/mine")
    task = ClassifyTask(model, tokenizer, seed=123)          # adds the 2-class head
    freeze(model, "last-block")                              # gpt2/finetune/adapt.py
    optimizer = make_optimizer(model, lr=5e-5, weight_decay=0.1)
    history = train(model, task.train_loader, task.val_loader, optimizer, epochs=5, eval_every=50,
                    eval_iter=5, loss_fn=task.loss_fn, eval_fn=task.eval_fn, hooks=task.hooks(model, 5),
                    sample_prompt=task.sample_prompt, tokenizer=tokenizer)
    results = task.finish(model, history, "runs/classify")   # accuracy on train/val/test, plots

    classify  chapter 6: SMS spam or not, from the last token through a new 2-class head
    instruct  chapter 7: Alpaca-formatted instructions, next-token loss on the padded, masked batches
    dpo       chapter 7's DPO notebook: chosen/rejected answers, against a frozen reference

BOOK_DEFAULTS holds the book's settings for each; `python -m gpt2 finetune TASK` uses them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import minigrad as mg

from ..errors import GPT2Error
from ..plot import plot_losses, plot_values
from .classify import add_classifier_head, classification_evaluation, classification_loss, evaluate_classifier
from .classify_data import classification_loader, load_spam_splits
from .dpo import DPOObjective
from .instruct_data import (
    InstructionDataset,
    format_input,
    instruction_loader,
    load_instruction_data,
    split_instruction_data,
)
from .preference_data import PreferenceDataset, load_preference_data, preference_loader
from .responses import RESPONSES_FILE, generate_responses, write_responses
from .sources import finetune_file

# The book's settings (chapter 6, chapter 7, and chapter 7's DPO notebook). Dropout 0 in all
# three (the book's drop_rate 0.0), AdamW over every trainable parameter.
BOOK_DEFAULTS = {
    "classify": dict(epochs=5, batch_size=8, lr=5e-5, weight_decay=0.1, eval_every=50, eval_iter=5,
                     trainable="last-block", responses=0),
    "instruct": dict(epochs=2, batch_size=8, lr=5e-5, weight_decay=0.1, eval_every=5, eval_iter=5,
                     trainable="all", responses=None),     # None: every test entry (110)
    "dpo": dict(epochs=1, batch_size=8, lr=5e-6, weight_decay=0.01, eval_every=5, eval_iter=5,
                trainable="all", responses=0, beta=0.1),
}
TASKS = tuple(BOOK_DEFAULTS)
RESULTS_FILE = "results.json"
# What each task writes at the top of its run directory besides the checkpoints and loss.png.
OUTPUTS = ("accuracy.png", "rewards.png", RESULTS_FILE, RESPONSES_FILE)


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _split(entries: list, path) -> tuple[list, list, list]:
    """The book's 85 / 5 / 10 split (train, val, test), each part needing an entry at least."""
    parts = split_instruction_data(entries)
    if not all(parts):
        raise GPT2Error(f"{path} has {len(entries)} entries, too few to split 85 / 5 / 10 into train, "
                        "validation and test sets with an entry in each (20 or more are enough)")
    return parts


def _check_language_model(model, task: str) -> None:
    if model.config.num_classes is not None:
        raise GPT2Error(f"{task} fine-tunes a language model, and this model is a classifier "
                        f"({model.config.num_classes} classes, no language-model head); start from a "
                        "pretrained GPT-2 or a checkpoint of one")


def _check_length(max_length: int, model, what: str) -> None:
    ctx = model.config.context_length
    if max_length > ctx:
        raise GPT2Error(f"{what} {max_length} tokens long, more than the model's context length {ctx}; "
                        f"cut them to at most {ctx} tokens (max_length, --max-length)")


class Task:
    """What every task provides (see the module's docstring)."""
    name = ""
    template: str | None = None      # the prompt template its checkpoints record (tokenizer.json)
    loss_fn = None                   # None: train()'s next-token cross-entropy
    eval_fn = None                   # None: train()'s mean loss over eval_iter batches
    sample_prompt: str | None = None
    data_path: Path
    data_sha256: str
    about: str                       # the data, in one line

    def hooks(self, model, eval_iter: int | None, say=print) -> list:
        """Hooks for train() (each called after every step with the TrainState)."""
        return []

    def finish(self, model, history, out, say=print, progress: bool = False) -> dict:
        raise NotImplementedError

    def _data(self, key: str, path, data_dir, download: bool) -> Path:
        self.data_path = Path(path) if path is not None else finetune_file(key, data_dir, download)
        if not self.data_path.is_file():
            raise GPT2Error(f"data file {self.data_path} does not exist")
        self.data_sha256 = _sha256(self.data_path)
        return self.data_path

    @staticmethod
    def _loss_plot(history, out, say) -> None:
        if history.epochs:
            say(f"saved loss plot to {plot_losses(history, Path(out) / 'loss.png')}")


# ---------------------------------------------------------------------------------------------
# classify: the book's chapter 6
# ---------------------------------------------------------------------------------------------

class ClassifyTask(Task):
    """Spam or not: the SMS Spam Collection balanced and split as the book (1,045 / 149 / 300
    messages, padded to the longest training message, 120 tokens), the loss and accuracy of the
    last token's logits. A model without a classifier head gets a new 2-class one (seeded by
    `seed`, as the book seeds it); a classifier of 2 classes keeps its own."""
    name = "classify"

    def __init__(self, model, tokenizer, path=None, batch_size: int = 8, seed: int = 123,
                 max_length: int | None = None, data_dir=None, download: bool = True):
        self._data("sms_spam", path, data_dir, download)
        splits = load_spam_splits(tokenizer, path=self.data_path, max_length=max_length)
        self.max_length = splits.train.max_length
        _check_length(self.max_length, model, "the messages are padded to")
        self.train_loader = classification_loader(splits.train, batch_size, shuffle=True, drop_last=True,
                                                  seed=seed)
        self.val_loader = classification_loader(splits.val, batch_size)
        self.test_loader = classification_loader(splits.test, batch_size)
        if model.config.num_classes is None:
            mg.manual_seed(seed)
            add_classifier_head(model, num_classes=2)
        elif model.config.num_classes != 2:
            raise GPT2Error(f"the model is a classifier of {model.config.num_classes} classes; spam "
                            "classification has 2")
        self.about = (f"{len(splits.train)} / {len(splits.val)} / {len(splits.test)} messages for "
                      f"train / val / test, padded to {self.max_length} tokens; "
                      f"{len(self.train_loader)} "
                      f"batches of {batch_size} per epoch")
        self.eval_fn = classification_evaluation

    @staticmethod
    def loss_fn(ids, labels, model):
        return classification_loss(model, ids, labels)

    def hooks(self, model, eval_iter: int | None, say=print) -> list:
        return [EpochAccuracy(model, self.train_loader, self.val_loader, eval_iter, say)]

    def finish(self, model, history, out, say=print, progress: bool = False) -> dict:
        """Accuracy and loss on the whole of each split (the training split as an epoch sees it:
        130 batches of 8), the loss and accuracy plots."""
        results = {}
        for split, loader in (("train", self.train_loader), ("val", self.val_loader),
                              ("test", self.test_loader)):
            loss, accuracy = evaluate_classifier(model, loader)
            results[split] = {"accuracy": accuracy, "loss": loss, "examples": _examples(loader)}
        say("Training accuracy: {:.2f}% | Validation accuracy: {:.2f}% | Test accuracy: {:.2f}%".format(
            *(100 * results[s]["accuracy"] for s in ("train", "val", "test"))))
        say("Training loss: {:.3f} | Validation loss: {:.3f} | Test loss: {:.3f}".format(
            *(results[s]["loss"] for s in ("train", "val", "test"))))
        if history.epochs:
            examples = [t // self.max_length for t in history.tokens_seen]
            plot_values(history.epochs, examples, history.train_losses, history.val_losses,
                        Path(out) / "loss.png", "loss", "Examples seen")
            plot = plot_values(history.epochs, examples, history.metric("train_accuracy"),
                               history.metric("val_accuracy"), Path(out) / "accuracy.png", "accuracy",
                               "Examples seen")
            say(f"saved loss and accuracy plots to {Path(out) / 'loss.png'} and {plot}")
        return results


def _examples(loader) -> int:
    n = len(loader.dataset)
    return len(loader) * loader.batch_size if loader.drop_last else n


class EpochAccuracy:
    """A hook for train(): after each epoch, the book's line "Training accuracy: 97.21% |
    Validation accuracy: 97.32%", over `eval_iter` batches of each loader (all when None)."""

    def __init__(self, model, train_loader, val_loader, eval_iter: int | None, say=print):
        self.model, self.train_loader, self.val_loader = model, train_loader, val_loader
        self.eval_iter, self.say = eval_iter, say
        self.epoch = train_loader.epoch   # epochs completed when training (re)starts

    def __call__(self, state) -> bool:
        if state.epoch > self.epoch:
            self.epoch = state.epoch
            _, train_acc = evaluate_classifier(self.model, self.train_loader, self.eval_iter)
            _, val_acc = evaluate_classifier(self.model, self.val_loader, self.eval_iter)
            self.say(f"Training accuracy: {100 * train_acc:.2f}% | Validation accuracy: {100 * val_acc:.2f}%")
        return False


# ---------------------------------------------------------------------------------------------
# instruct: the book's chapter 7
# ---------------------------------------------------------------------------------------------

class InstructTask(Task):
    """Instruction following: the book's 1,100 entries in the Alpaca format, split 935 / 55 / 110
    (train / val / test), batches padded to their longest entry with the padding's targets -100
    (all but the first <|endoftext|>), cut to `max_length` (default: the model's context), and
    with `mask_prompt` the prompt's targets -100 too. The loss is train()'s own: next-token
    cross-entropy over the targets that are not -100. After each epoch the model answers the first
    validation entry (the book's sample); at the end, the test entries (`finish`)."""
    name = "instruct"
    template = "alpaca"

    def __init__(self, model, tokenizer, path=None, batch_size: int = 8, seed: int = 123,
                 max_length: int | None = None, mask_prompt: bool = False, data_dir=None,
                 download: bool = True):
        _check_language_model(model, self.name)
        self._data("instructions", path, data_dir, download)
        self.tokenizer = tokenizer
        self.train_data, self.val_data, self.test_data = _split(load_instruction_data(path=self.data_path),
                                                                self.data_path)
        self.max_length = max_length or model.config.context_length
        _check_length(self.max_length, model, "batches would be cut to")
        make = lambda entries: InstructionDataset(entries, tokenizer, self.max_length, mask_prompt)  # noqa: E731
        self.train_loader = instruction_loader(make(self.train_data), batch_size, shuffle=True,
                                               drop_last=True, seed=seed)
        self.val_loader = instruction_loader(make(self.val_data), batch_size)
        self.sample_prompt = format_input(self.val_data[0])
        self.about = (f"{len(self.train_data)} / {len(self.val_data)} / {len(self.test_data)} entries "
                      f"for train / val / test, Alpaca prompts, batches padded to their longest entry "
                      f"and cut to {self.max_length} tokens, prompt "
                      f"{'masked' if mask_prompt else 'not masked'}; {len(self.train_loader)} "
                      f"batches of {batch_size} per epoch")

    def finish(self, model, history, out, say=print, progress: bool = False, responses: int | None = None,
               max_new_tokens: int = 256) -> dict:
        """The loss plot, and the model's answers to the first `responses` test entries (all when
        None; 0: none) in out/instruction-data-with-response.json."""
        self._loss_plot(history, out, say)
        results = _last_evaluation(history)
        entries = self.test_data if responses is None else self.test_data[:responses]
        if entries:
            answered = generate_responses(model, self.tokenizer, entries, max_new_tokens, progress=progress)
            path = write_responses(answered, Path(out) / RESPONSES_FILE)
            say(f"saved the model's responses to {len(answered)} test entries to {path}")
            results["responses"] = {"file": path.name, "entries": len(answered)}
        return results


def _last_evaluation(history) -> dict:
    if not history.steps:
        return {}
    return {"step": history.steps[-1], "train_loss": history.train_losses[-1],
            "val_loss": history.val_losses[-1], **(history.metrics[-1] if history.metrics else {})}


# ---------------------------------------------------------------------------------------------
# dpo: the book's chapter 7 DPO notebook
# ---------------------------------------------------------------------------------------------

class DPOTask(InstructTask):
    """Direct preference optimization on the book's preference data (the instruction entries,
    each with a chosen and a rejected answer; the same 935 / 55 / 110 split): the DPO loss of the
    policy (the model being trained) against `reference`, a frozen copy of where it started
    (adapt.frozen_copy), with `beta`. Batches are stacked: the chosen and rejected sequences of
    a batch of B pairs are one (2B, T) array, padded to its longest, the response tokens scored
    (with `mask_prompt`, the book's default, not the prompt's). Evaluations print the reward
    margin and the chosen and rejected rewards of each split."""
    name = "dpo"
    template = "alpaca"

    def __init__(self, model, tokenizer, reference, path=None, batch_size: int = 8, seed: int = 123,
                 max_length: int | None = None, mask_prompt: bool = True, beta: float = 0.1,
                 data_dir=None, download: bool = True):
        _check_language_model(model, self.name)
        if not (isinstance(beta, (int, float)) and beta > 0):
            raise GPT2Error(f"DPO's beta must be a number > 0, got {beta!r}")
        self._data("preferences", path, data_dir, download)
        self.tokenizer = tokenizer
        self.train_data, self.val_data, self.test_data = _split(load_preference_data(path=self.data_path),
                                                                self.data_path)
        self.max_length = max_length or model.config.context_length
        _check_length(self.max_length, model, "batches would be cut to")
        make = lambda entries: PreferenceDataset(entries, tokenizer, self.max_length, mask_prompt,  # noqa: E731
                                                 stacked=True)
        self.train_loader = preference_loader(make(self.train_data), batch_size, shuffle=True, drop_last=True,
                                              seed=seed)
        self.val_loader = preference_loader(make(self.val_data), batch_size)
        self.objective = DPOObjective(reference, beta)
        self.loss_fn, self.eval_fn = self.objective, self.objective.evaluate
        self.sample_prompt = format_input(self.val_data[min(2, len(self.val_data) - 1)])   # the book's: 2
        self.about = (f"{len(self.train_data)} / {len(self.val_data)} / {len(self.test_data)} preference "
                      f"pairs for train / val / test, chosen and rejected answers stacked in batches "
                      f"padded to their longest and cut to {self.max_length} tokens, "
                      f"{'response tokens scored' if mask_prompt else 'prompt and response tokens scored'}; "
                      f"beta {beta:g}; {len(self.train_loader)} batches of {batch_size} pairs per epoch")

    def finish(self, model, history, out, say=print, progress: bool = False, responses: int | None = 0,
               max_new_tokens: int = 256) -> dict:
        """The loss and reward-margin plots, and (`responses` > 0) answers as InstructTask's."""
        results = super().finish(model, history, out, say, progress, responses, max_new_tokens)
        if history.epochs:
            plot = plot_values(history.epochs, history.tokens_seen, history.metric("train_reward_margin"),
                               history.metric("val_reward_margin"), Path(out) / "rewards.png",
                               "reward margin")
            say(f"saved reward margin plot to {plot}")
        return results


def make_task(name: str, model, tokenizer, reference=None, **options) -> Task:
    """The task called `name` (classify, instruct, dpo) for `model`; `reference` is DPO's."""
    if name == "classify":
        return ClassifyTask(model, tokenizer, **options)
    if name == "instruct":
        return InstructTask(model, tokenizer, **options)
    if name == "dpo":
        if reference is None:
            raise GPT2Error("DPO needs a reference model (adapt.frozen_copy of the model before training)")
        return DPOTask(model, tokenizer, reference, **options)
    raise GPT2Error(f"unknown fine-tuning task {name!r}; choose one of {', '.join(TASKS)}")
