"""`python -m gpt2 prepare`: tokenize a corpus into a prepared dataset folder (gpt2/prepare.py)."""

from __future__ import annotations

from pathlib import Path

from ..data import NAMED_TEXTS, named_text_path
from ..errors import GPT2Error
from ..prepare import prepare
from .flags import PROG, require_finite, require_positive


def add_arguments(p) -> None:
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a UTF-8 text file, a folder of them, or a dataset name: verdict (The Verdict) or "
                   "shakespeare (Tiny Shakespeare), downloaded into the data folder and checked by SHA-256")
    p.add_argument("--out", required=True, metavar="DIR", help="the dataset folder to create")
    p.add_argument("--tokenizer", choices=["gpt2", "char"], default="gpt2",
                   help="gpt2: GPT-2's BPE (50,257 tokens); char: one token per character of the corpus")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="share of the tokens, from the end, kept for validation")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes encoding a large input (default: the number of CPUs)")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="where named datasets are downloaded (default: $GPT2_DATA_DIR, else data/)")
    p.add_argument("--overwrite", action="store_true", help="replace a prepared dataset already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    require_finite("--val-fraction", args.val_fraction)
    if not 0.0 < args.val_fraction < 1.0:
        raise GPT2Error(f"--val-fraction must be in (0, 1), e.g. 0.1, got {args.val_fraction}")
    require_positive("--workers", args.workers, allow_none=True)
    # A name (verdict, shakespeare) is a download unless a file or folder of that name exists here.
    sources = [named_text_path(s, args.data_dir) if s in NAMED_TEXTS and not Path(s).exists() else Path(s)
               for s in args.sources]
    m = prepare(sources, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress)
    n_bytes = sum(src["bytes"] for src in m["sources"])
    print(f"prepared {args.out}: {len(m['sources'])} file(s), {n_bytes:,} bytes -> {m['tokens']:,} tokens "
          f"({args.tokenizer} tokenizer, vocabulary {m['vocab_size']:,}, {m['dtype']}); train "
          f"{m['splits']['train']['tokens']:,}, val {m['splits']['val']['tokens']:,} tokens; "
          f"{m['seconds']:.1f} s ({m['tokens'] / max(m['seconds'], 1e-9):,.0f} tokens/s)")
    print(f"train on it with: {PROG} train --data {args.out} ...")
    return 0
