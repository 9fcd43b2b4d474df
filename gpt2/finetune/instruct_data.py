"""Instruction data (the book's chapter 7): Alpaca-style prompts, and batches that teach responses.

    data = load_instruction_data()                       # 1,100 {"instruction", "input", "output"}
    train, val, test = split_instruction_data(data)      # 935 / 55 / 110, in file order
    dataset = InstructionDataset(train, tokenizer, max_length=1024, mask_prompt=False)
    loader = instruction_loader(dataset, batch_size=8, shuffle=True, drop_last=True)
    for inputs, targets in loader: ...                   # (8, T) each; T varies by batch

One example is the prompt (`format_input`) followed by the response (`format_response`), as one
token sequence. A batch is padded to its own longest example, so T changes from batch to batch:

    tokens    t0 t1 t2 t3            (one example of 4 tokens; the batch's longest has 5)
    + pad     t0 t1 t2 t3 P P        (one <|endoftext|> P to end it, then padding to 5 + 1)
    inputs    t0 t1 t2 t3 P          (all but the last)
    targets   t1 t2 t3 P  -100       (all but the first: each position predicts the next token)

The first P in the targets stays: the model must learn to end its answer. Every later padding
target becomes -100, the index `cross_entropy` ignores. With prompt masking (the book's
exercise 7.2) the targets that are prompt tokens become -100 as well, so the loss counts only
the response (and its end).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data import DataLoader
from ..errors import GPT2Error
from .sources import finetune_file

PAD_ID = 50256        # <|endoftext|>: ends each example, and pads
IGNORE_INDEX = -100   # targets cross_entropy skips


def format_input(entry: dict) -> str:
    """The Alpaca prompt, exactly as the book: the instruction, then the input if there is one."""
    instruction_text = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
    return instruction_text + input_text


def format_response(entry: dict, key: str = "output") -> str:
    """What follows the prompt: the response header and the answer (entry[key])."""
    return f"\n\n### Response:\n{entry[key]}"


def read_json_entries(path, keys=("instruction", "input", "output")) -> list[dict]:
    """A JSON list of dicts that each have `keys`; GPT2Error (one line) otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GPT2Error(f"cannot read {path} as JSON: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(e, dict) and all(k in e for k in keys)
                                              for e in data):
        raise GPT2Error(f"{path} is not a JSON list of entries with the keys {', '.join(keys)}")
    return data


def load_instruction_data(data_dir=None, download: bool = True, path=None) -> list[dict]:
    """The book's 1,100 instruction entries (`path`, or fetched once)."""
    path = path if path is not None else finetune_file("instructions", data_dir, download)
    return read_json_entries(path)


def split_instruction_data(data: list) -> tuple[list, list, list]:
    """(train, val, test) as the book cuts them, in file order: the first 85% train, the next 10%
    test, the rest (5%) validation. For 1,100 entries: train 935, test 110, val 55."""
    train_end = int(len(data) * 0.85)
    test_end = train_end + int(len(data) * 0.1)
    return data[:train_end], data[test_end:], data[train_end:test_end]


def collate_instructions(examples: list[list[int]], prompt_lengths=None, pad_id: int = PAD_ID,
                         ignore_index: int = IGNORE_INDEX, max_length: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> inputs, targets, each (B, T) int64 (the book's custom_collate_fn).

    T = longest example + 1 (for the closing <|endoftext|>), then cut to `max_length`. Targets:
    all padding but the first -> ignore_index; with `prompt_lengths` (tokens of each example's
    prompt), the first prompt_length - 1 targets too (those positions predict prompt tokens 1..).
    """
    if not examples:
        raise GPT2Error("cannot make a batch of no examples")
    B = len(examples)
    width = max(len(e) for e in examples) + 1                        # + the closing pad
    padded = np.full((B, width), pad_id, dtype=np.int64)             # (B, T + 1)
    for row, ids in zip(padded, examples):
        row[:len(ids)] = ids
    inputs, targets = padded[:, :-1], padded[:, 1:].copy()           # (B, T) each
    is_pad = targets == pad_id
    later_pad = is_pad & (np.cumsum(is_pad, axis=1) > 1)             # every pad but the first
    targets[later_pad] = ignore_index
    if prompt_lengths is not None:
        cut = np.asarray(prompt_lengths, dtype=np.int64)[:, None] - 1
        targets[np.arange(targets.shape[1])[None, :] < cut] = ignore_index
    if max_length is not None:
        inputs, targets = inputs[:, :max_length], targets[:, :max_length]
    return np.ascontiguousarray(inputs), np.ascontiguousarray(targets)


class InstructionDataset:
    """Entries tokenized once (prompt + response), batched by `collate_instructions`.

    `batch(index)` makes the padded (inputs, targets) of those entries, so it plugs into
    gpt2.data's DataLoader. `max_length` cuts every batch (the book: 1024, the context length).
    """

    def __init__(self, entries: list[dict], tokenizer, max_length: int | None = None,
                 mask_prompt: bool = False, pad_id: int = PAD_ID, ignore_index: int = IGNORE_INDEX):
        self.entries = entries
        self.examples, self.prompt_lengths = [], []
        for entry in entries:
            prompt = format_input(entry)
            self.examples.append(tokenizer.encode(prompt + format_response(entry)))
            self.prompt_lengths.append(len(tokenizer.encode(prompt)))
        self.prompt_lengths = np.array(self.prompt_lengths, dtype=np.int64)
        self.mask_prompt = mask_prompt
        self.pad_id, self.ignore_index = pad_id, ignore_index
        self.max_length = max_length if max_length is not None else \
            max((len(e) for e in self.examples), default=0) + 1

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, index) -> tuple[np.ndarray, np.ndarray]:
        index = np.asarray(index).reshape(-1)
        return collate_instructions([self.examples[i] for i in index],
                                    self.prompt_lengths[index] if self.mask_prompt else None,
                                    self.pad_id, self.ignore_index, self.max_length)


def instruction_loader(dataset: InstructionDataset, batch_size: int, shuffle: bool = False,
                       drop_last: bool = False, seed: int = 0) -> DataLoader:
    """Batches (inputs, targets) of a dataset: gpt2.data's DataLoader. The book: batch 8,
    training shuffled with drop_last (116 batches of 935 entries)."""
    return DataLoader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)
