"""`python -m gpt2 eval`: a model's loss, perplexity and bits per byte on a text file or a
prepared dataset's split (gpt2/perplexity.py)."""

from __future__ import annotations

import json
from pathlib import Path

from ..data import read_text
from ..dataset import SPLITS, PreparedDataset
from ..errors import GPT2Error
from ..perplexity import evaluate_dataset, evaluate_text
from .flags import require_positive
from .generate import add_model_arguments, load_model_and_tokenizer


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--data", required=True, metavar="TEXT_OR_DATASET",
                   help="a UTF-8 text file, or a dataset folder made by `prepare`")
    p.add_argument("--split", choices=list(SPLITS), default="val",
                   help="the split of a prepared dataset to evaluate")
    p.add_argument("--batch-size", type=int, default=4, metavar="N",
                   help="windows per forward pass (GPT-2's logits are 200 MB per window of 1024)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")


def run(args) -> int:
    require_positive("--batch-size", args.batch_size)
    path = Path(args.data)
    if not path.exists():
        raise GPT2Error(f"--data {path} does not exist; give a UTF-8 text file or a prepared dataset folder")
    dataset = None
    if path.is_dir():
        dataset = PreparedDataset(path)   # (a folder that is not one: the error says how to make it)
    elif args.split != "val":
        raise GPT2Error("--split applies to a prepared dataset; a text file is evaluated whole")
    text = None if dataset is not None else read_text(path)
    model, tokenizer = load_model_and_tokenizer(args)
    if dataset is not None:
        if dataset.tokenizer.to_dict() != tokenizer.to_dict():
            raise GPT2Error(f"{path} was prepared with the {dataset.tokenizer.name} tokenizer "
                            f"(vocabulary {dataset.vocab_size:,}) and the model uses {tokenizer.name} "
                            f"({tokenizer.vocab_size:,}); prepare the text with the model's tokenizer, or "
                            "pass the text file")
        result = evaluate_dataset(model, dataset, args.split, args.batch_size)
        what = f"{path} ({args.split} split)"
    else:
        try:
            result = evaluate_text(model, tokenizer, text, args.batch_size)
        except GPT2Error as exc:
            raise GPT2Error(f"{path}: {exc}") from None
        what = str(path)
    if args.json:
        print(json.dumps({"data": str(path), "split": args.split if dataset is not None else None,
                          "tokens": result.tokens, "bytes": result.bytes, "loss": result.loss,
                          "perplexity": result.perplexity, "bits_per_byte": result.bits_per_byte}))
    else:
        print(f"{what}: {result.tokens:,} tokens ({tokenizer.name} tokenizer), {result.bytes:,} bytes: "
              f"loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.2f}, "
              f"{result.bits_per_byte:.4f} bits per byte")
    return 0
