"""An instruction-tuned model's answers to the test set, saved as the book's chapter 7 saves them
(instruction-data-with-response.json: each entry with its "model_response").

    entries = generate_responses(model, tokenizer, test_data, max_new_tokens=256)
    write_responses(entries, "runs/instruct/instruction-data-with-response.json")

Each answer is greedy decoding of the entry's Alpaca prompt (format_input) for up to
`max_new_tokens` tokens, stopped at <|endoftext|>; the response is the text after the prompt,
without its "### Response:" heading, stripped, as the book does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import safeio
from ..generate import generate
from .instruct_data import PAD_ID, format_input

RESPONSES_FILE = "instruction-data-with-response.json"


def generate_response(model, tokenizer, entry: dict, max_new_tokens: int = 256, eos_id: int = PAD_ID) -> str:
    """The model's answer to one entry (greedy, stopped at eos_id)."""
    ids = np.asarray(tokenizer.encode(format_input(entry)), dtype=np.int64)
    out = generate(model, ids, max_new_tokens, eos_id=eos_id)
    text = tokenizer.decode(out[len(ids):])                  # "\n\n### Response:\n..." and the answer
    return text.replace("### Response:", "").strip()


def generate_responses(model, tokenizer, entries: list[dict], max_new_tokens: int = 256,
                       key: str = "model_response", progress: bool = False) -> list[dict]:
    """Copies of `entries`, each with the model's answer under `key`."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    out = []
    for entry in tqdm(entries, desc="responses", unit="entry", disable=not progress, leave=False):
        out.append({**entry, key: generate_response(model, tokenizer, entry, max_new_tokens)})
    return out


def write_responses(entries: list[dict], path) -> Path:
    """The entries as the book writes them (json.dump with indent=4), written atomically."""
    path = Path(path)
    safeio.write_text(path, json.dumps(entries, indent=4) + "\n")
    return path
