"""Spam classification data (the book's chapter 6): SMS messages as padded token ids and 0/1 labels.

    splits = load_spam_splits(tokenizer)          # balanced, shuffled, split 70/10/20 as the book
    splits.train.ids.shape, splits.train.labels   # (1045, 120) int64, (1045,) 0 = ham, 1 = spam
    loader = classification_loader(splits.train, batch_size=8, shuffle=True, drop_last=True)
    for ids, labels in loader: ...                # (8, 120), (8,)

The steps, each the book's:
1. read the tab-separated file: 4,825 "ham" and 747 "spam" messages;
2. balance the classes by keeping a random 747 of the ham messages (seed 123);
3. shuffle the 1,494 messages (seed 123) and cut them 70% / 10% / 20%: 1045 / 149 / 300;
4. tokenize, and pad every message with <|endoftext|> (50256) to the longest *training*
   message (120 tokens); longer validation or test messages are cut to that length.

The book does 2 and 3 with pandas (`df.sample(n, random_state=123)`), which draws
`numpy.random.RandomState(123).permutation(len)[:n]`; the same call here picks the same
messages in the same order, without pandas.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass

import numpy as np

from ..data import DataLoader
from ..errors import GPT2Error
from .sources import finetune_file

PAD_ID = 50256  # GPT-2's <|endoftext|>, the book's padding token
LABELS = {"ham": 0, "spam": 1}
SEED = 123


def read_sms_collection(path) -> list[tuple[int, str]]:
    """(label, text) for every message of the SMS Spam Collection file; 0 = ham, 1 = spam.

    Read as pandas' read_csv(sep="\\t") reads it (the book's loader), with CSV quoting: a field
    that starts with a double quote runs to the closing quote. That is why the file's 5,574
    lines give 5,572 messages, as in the book: one message opens a quote that closes two lines
    later, so those three lines are read as one (ham) message.
    """
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError) as exc:
        raise GPT2Error(f"cannot read the SMS Spam Collection from {path}: {exc}") from None
    messages = []
    for i, row in enumerate(rows):
        if len(row) != 2 or row[0] not in LABELS:
            raise GPT2Error(f"{path}: row {i + 1} is not 'ham|spam<TAB>text'; is it the SMS Spam "
                            "Collection file?")
        messages.append((LABELS[row[0]], row[1]))
    return messages


def balance(messages: list[tuple[int, str]], seed: int = SEED) -> list[tuple[int, str]]:
    """Undersample ham to the number of spam messages: the sampled ham first, then all spam, as
    the book's create_balanced_dataset (pandas' sample: RandomState(seed).permutation)."""
    ham = [m for m in messages if m[0] == 0]
    spam = [m for m in messages if m[0] == 1]
    keep = np.random.RandomState(seed).permutation(len(ham))[:len(spam)]
    return [ham[i] for i in keep] + spam


def random_split(items: list, train_frac: float = 0.7, val_frac: float = 0.1,
                 seed: int = SEED) -> tuple[list, list, list]:
    """Shuffle (RandomState(seed).permutation, as pandas' sample(frac=1)) and cut into train,
    validation and test: int(n * train_frac), int(n * val_frac) and the rest (the book's)."""
    order = np.random.RandomState(seed).permutation(len(items))
    shuffled = [items[i] for i in order]
    train_end = int(len(items) * train_frac)
    val_end = train_end + int(len(items) * val_frac)
    return shuffled[:train_end], shuffled[train_end:val_end], shuffled[val_end:]


@dataclass
class LabelledTokens:
    """A split as arrays: ids (N, max_length) int64 padded with PAD_ID, labels (N,) int64."""
    ids: np.ndarray
    labels: np.ndarray

    @property
    def max_length(self) -> int:
        return self.ids.shape[1]

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index) -> tuple[np.ndarray, np.ndarray]:
        """Examples `index` (an int array (B,)) -> ids (B, max_length), labels (B,)."""
        return self.ids[index], self.labels[index]


def pad_token_ids(encoded: list[list[int]], max_length: int | None = None,
                  pad_id: int = PAD_ID) -> np.ndarray:
    """Token id lists -> one (N, L) int64 array, each row cut to L and padded with pad_id.
    L is `max_length`, or the longest list when it is None (the book's SpamDataset)."""
    if max_length is None:
        max_length = max((len(e) for e in encoded), default=0)
    out = np.full((len(encoded), max_length), pad_id, dtype=np.int64)
    for row, ids in zip(out, encoded):
        ids = ids[:max_length]
        row[:len(ids)] = ids
    return out


@dataclass
class ClassificationSplits:
    train: LabelledTokens
    val: LabelledTokens
    test: LabelledTokens


def encode_splits(train, val, test, tokenizer, max_length: int | None = None,
                  pad_id: int = PAD_ID) -> ClassificationSplits:
    """Tokenize (label, text) splits; all are padded to the longest training message (or to
    `max_length`, which also cuts longer training messages)."""
    def encode(split):
        return [tokenizer.encode(text) for _, text in split]

    train_ids = pad_token_ids(encode(train), max_length, pad_id)
    length = train_ids.shape[1]

    def labelled(split, ids):
        return LabelledTokens(ids, np.array([label for label, _ in split], dtype=np.int64))

    return ClassificationSplits(labelled(train, train_ids),
                                labelled(val, pad_token_ids(encode(val), length, pad_id)),
                                labelled(test, pad_token_ids(encode(test), length, pad_id)))


def load_spam_splits(tokenizer, data_dir=None, download: bool = True, path=None,
                     max_length: int | None = None) -> ClassificationSplits:
    """The book's chapter 6 data, end to end: the file (`path`, or fetched once), balanced,
    split 70/10/20 and padded."""
    path = path if path is not None else finetune_file("sms_spam", data_dir, download)
    train, val, test = random_split(balance(read_sms_collection(path)), 0.7, 0.1)
    return encode_splits(train, val, test, tokenizer, max_length)


def classification_loader(split: LabelledTokens, batch_size: int, shuffle: bool = False,
                          drop_last: bool = False, seed: int = 0) -> DataLoader:
    """Batches (ids (B, L), labels (B,)) of a split: gpt2.data's DataLoader (seeded shuffling
    per epoch, resumable). The book trains with batch 8, shuffled, drop_last: 130 batches."""
    return DataLoader(split, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)
