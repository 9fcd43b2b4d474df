"""Preference data for DPO (the book's chapter 7 DPO notebook): each prompt with a chosen and a
rejected response, as padded token ids and masks that pick the response tokens.

    data = load_preference_data()                        # 1,100 entries, + "chosen" / "rejected"
    train, val, test = split_instruction_data(data)      # 935 / 55 / 110, as for chapter 7
    dataset = PreferenceDataset(train, tokenizer, max_length=1024)
    for chosen, rejected in preference_loader(dataset, batch_size=8, shuffle=True, drop_last=True):
        chosen.ids, chosen.mask                          # (8, T) int64, (8, T) bool; same T for both

Unlike instruction batches these are not shifted into inputs and targets: DPO scores a whole
sequence, and `gpt2.finetune.dpo.response_logprobs` does the shift. The mask is True on the
tokens whose log-probability counts: not padding, and (with mask_prompt, the default) not the
prompt and the two newline tokens before "### Response:" either.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..data import DataLoader
from ..errors import GPT2Error
from .instruct_data import PAD_ID, format_input, read_json_entries
from .sources import finetune_file


class SequenceBatch(NamedTuple):
    ids: np.ndarray    # (B, T) int64, padded with PAD_ID
    mask: np.ndarray   # (B, T) bool, True on the tokens to score


def load_preference_data(data_dir=None, download: bool = True, path=None) -> list[dict]:
    """The book's 1,100 preference entries (`path`, or fetched once)."""
    path = path if path is not None else finetune_file("preferences", data_dir, download)
    return read_json_entries(path, keys=("instruction", "input", "chosen", "rejected"))


def collate_preferences(prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]],
                        pad_id: int = PAD_ID, max_length: int | None = None,
                        mask_prompt: bool = True) -> tuple[SequenceBatch, SequenceBatch]:
    """(chosen, rejected) batches, both padded to one width (the book's custom_collate_fn):
    the longest of all chosen and rejected sequences + 1, then cut to `max_length`.

    `prompts[i]` is the prompt's tokens; with mask_prompt its len + 2 first positions are
    masked (the prompt and the "\\n\\n" before "### Response:", which GPT-2 encodes as 2 tokens).
    """
    if not prompts:
        raise GPT2Error("cannot make a batch of no examples")
    width = max(len(s) + 1 for s in (*chosen, *rejected))
    positions = np.arange(width)[None, :]                                       # (1, T)
    prompt_end = np.array([len(p) + 2 for p in prompts], dtype=np.int64)[:, None]

    def pad(sequences):
        ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
        for row, seq in zip(ids, sequences):
            row[:len(seq)] = seq
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)[:, None]
        mask = positions < lengths                                              # not padding
        if mask_prompt:
            mask &= positions >= prompt_end                                     # not the prompt
        return SequenceBatch(np.ascontiguousarray(ids[:, :max_length]),
                             np.ascontiguousarray(mask[:, :max_length]))

    return pad(chosen), pad(rejected)


class PreferenceDataset:
    """Entries tokenized once: the prompt alone, prompt + chosen response, prompt + rejected
    response (each response after "\\n\\n### Response:\\n", as the book's PreferenceDataset).
    `batch(index)` gives (chosen, rejected) SequenceBatches, for gpt2.data's DataLoader; with
    `stacked`, one (ids, mask) pair of (2B, T) arrays instead, the B chosen rows first, then the
    B rejected ones (`dpo.dpo_stacked_loss` runs each model once over both, and a training loop
    that counts a batch's tokens by its first array counts both)."""

    def __init__(self, entries: list[dict], tokenizer, max_length: int | None = None,
                 mask_prompt: bool = True, pad_id: int = PAD_ID, stacked: bool = False):
        self.entries = entries
        self.prompts, self.chosen, self.rejected = [], [], []
        for entry in entries:
            prompt = format_input(entry)
            self.prompts.append(tokenizer.encode(prompt))
            self.chosen.append(tokenizer.encode(f"{prompt}\n\n### Response:\n{entry['chosen']}"))
            self.rejected.append(tokenizer.encode(f"{prompt}\n\n### Response:\n{entry['rejected']}"))
        self.mask_prompt, self.pad_id, self.stacked = mask_prompt, pad_id, stacked
        self.max_length = max_length if max_length is not None else \
            max((len(s) + 1 for s in (*self.chosen, *self.rejected)), default=0)

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, index) -> tuple[SequenceBatch, SequenceBatch] | tuple[np.ndarray, np.ndarray]:
        index = np.asarray(index).reshape(-1)
        chosen, rejected = collate_preferences(
            [self.prompts[i] for i in index], [self.chosen[i] for i in index],
            [self.rejected[i] for i in index], self.pad_id, self.max_length, self.mask_prompt)
        if self.stacked:
            return np.concatenate([chosen.ids, rejected.ids]), np.concatenate([chosen.mask, rejected.mask])
        return chosen, rejected


def preference_loader(dataset: PreferenceDataset, batch_size: int, shuffle: bool = False,
                      drop_last: bool = False, seed: int = 0) -> DataLoader:
    """Batches (chosen, rejected) of a dataset: gpt2.data's DataLoader."""
    return DataLoader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)
