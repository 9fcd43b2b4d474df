"""The command line: `python -m gpt2 prepare | train | generate | bench | selftest`.

A thin layer over functions a user could call from Python: it parses flags, checks them, calls
gpt2.data / gpt2.train / gpt2.checkpoint / gpt2.generate, and turns our own errors (GPT2Error,
minigrad's BackendError) into one line on stderr, `error: ...`, with exit code 2.

Here: the parser, `main` and the small commands (prepare, generate). The train command is
gpt2/train_command.py, its flags gpt2/train_flags.py; bench and selftest bring their own flags
too (gpt2/bench.py, gpt2/selftest.py).

    python -m gpt2 train --out runs/verdict                       # the course run (chapter 05)
    python -m gpt2 train --resume runs/verdict                    # continue it after Ctrl-C or a crash
    python -m gpt2 generate --checkpoint runs/verdict --prompt "Every effort moves you"
    python -m gpt2 prepare shakespeare --tokenizer char --out data/shakespeare_char
    python -m gpt2 train --data data/shakespeare_char ...                # see README: Shakespeare
    mpiexec -n 2 python -m gpt2 train --batch-size 1               # data parallel: 2 ranks x batch 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import minigrad as mg

from . import train_flags
from .errors import GPT2Error
from .flags import PROG, flag_name, one_line, require_finite, require_positive, use_backend
from .train_command import cmd_train


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: X)" after a flag's help, unless the help already says it or X is empty."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


# ---------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (`error: ...`, exit code 2) like our own
    errors, instead of the usage block followed by the message."""

    def error(self, message):
        from minigrad.distributed import launched_rank  # noqa: PLC0415

        if launched_rank() > 0:   # under mpiexec every rank parses the same line: rank 0 reports
            self.exit(2)
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="GPT-2 from scratch on minigrad: prepare data, train, generate, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{prepare,train,generate,bench,selftest}")
    _add_prepare(sub)
    _add_train(sub)
    _add_generate(sub)
    _add_bench(sub)
    _add_selftest(sub)
    return parser


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", formatter_class=_Help, help="tokenize a corpus into a prepared dataset",
                       description="Tokenize UTF-8 text (files, folders, or a named dataset: verdict, "
                       "shakespeare) into a prepared dataset folder for `train --data`: token ids in "
                       "binary shards, a train/validation split and a manifest.json. Streams the text "
                       "(any size) and uses several processes for large inputs.")
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
    p.set_defaults(func=cmd_prepare)


def _add_train(sub) -> None:
    p = sub.add_parser("train", formatter_class=_Help,
                       help="train a GPT-2 from scratch on a text file or a prepared dataset",
                       description="Train a GPT-2 from scratch. The defaults are the course run of "
                       "chapter 05 (LLMs from Scratch, chapter 5): the 124M shape with context 256, "
                       "dropout 0.1, no qkv bias and an untied output head, AdamW lr 4e-4 and weight "
                       "decay 0.1, batch 2, 10 epochs, seed 123, on The Verdict.")
    train_flags.add_arguments(p)   # beside their checks and what --resume may change
    p.set_defaults(func=cmd_train)


def _add_generate(sub) -> None:
    fmt = _Help
    p = sub.add_parser("generate", formatter_class=fmt, help="continue a prompt with a trained model",
                       description="Continue a prompt with a checkpoint from `train`, or with "
                       "OpenAI's pretrained weights. Temperature 0 is greedy decoding.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="a checkpoint directory written by `train`")
    src.add_argument("--pretrained", metavar="NAME_OR_DIR",
                     help="OpenAI's GPT-2 weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a local "
                     "directory holding them")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=50, metavar="N", help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0: greedy; > 0: sample from softmax(logits / T)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample only from the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus sampling: the smallest set of tokens with probability >= P, P in (0, 1]")
    p.add_argument("--seed", type=int, default=None, metavar="N", help="seed for sampling")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy",
                   help="numpy (CPU) or cupy (NVIDIA GPU)")
    p.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="where --pretrained weights are downloaded and cached")
    p.add_argument("--no-cache", action="store_true",
                   help="turn the KV cache off (recompute the whole context for every token)")
    p.set_defaults(func=cmd_generate)


def _add_bench(sub) -> None:
    """`bench` lives in gpt2/bench.py (its own flags and runner); registered when present."""
    try:
        from . import bench  # noqa: PLC0415
    except ModuleNotFoundError as exc:
        if exc.name == f"{__package__}.bench":
            return  # no benchmark module in this version
        bench, problem = None, exc
    except Exception as exc:  # a broken bench module must not break train/generate
        bench, problem = None, exc
    p = sub.add_parser("bench", help="time training steps and generation")
    if bench is None:
        def broken(args):
            raise GPT2Error(f"gpt2.bench could not be imported: {type(problem).__name__}: {problem}")
        p.set_defaults(func=broken)
        return
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)


def _add_selftest(sub) -> None:
    from . import selftest  # noqa: PLC0415

    p = sub.add_parser("selftest", formatter_class=_Help, help="check this machine's GPU (or CPU) end to end",
                       description="The acceptance run for a GPU: kernels against their NumPy twins, "
                       "float64 gradient checks, a short course-model training run, generation with and "
                       "without the KV cache, the benchmark and pytest's CuPy half; exit code 1 if any "
                       "fails.")
    selftest.add_arguments(p)
    p.set_defaults(func=selftest.run_cli)


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------

def cmd_prepare(args) -> int:
    from .data import NAMED_TEXTS, named_text_path  # noqa: PLC0415
    from .prepare import prepare  # noqa: PLC0415

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


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------

def cmd_generate(args) -> int:
    from .generate import check_sampling_args, generate  # noqa: PLC0415
    from .tokenizer import get_tokenizer  # noqa: PLC0415

    require_positive("--max-new-tokens", args.max_new_tokens)
    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                        names={name: flag_name(name)
                               for name in ("max_new_tokens", "temperature", "top_k", "top_p")})
    if args.cache_dir is not None and args.pretrained is None:
        raise GPT2Error("--cache-dir only applies to --pretrained")
    if not args.prompt:
        raise GPT2Error("--prompt must not be empty")
    if args.seed is not None and args.seed < 0:
        raise GPT2Error(f"--seed must be an integer >= 0, got {args.seed}")
    use_backend(args.backend)

    tokenizer = None
    if args.checkpoint is not None:
        from .checkpoint import load_model, load_tokenizer  # noqa: PLC0415
        # The tokenizer it was trained with (recorded in the checkpoint; GPT-2's BPE if none is).
        model = load_model(args.checkpoint)
        tokenizer = load_tokenizer(args.checkpoint)
    else:
        try:
            from .pretrained import load_pretrained  # noqa: PLC0415
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.pretrained":
                raise
            raise GPT2Error("--pretrained is not available in this version (gpt2/pretrained.py is "
                            "missing); use --checkpoint") from None
        model = load_pretrained(args.pretrained, backend=args.backend, cache_dir=args.cache_dir)
    tokenizer = tokenizer or get_tokenizer()
    ids = np.asarray(tokenizer.encode(args.prompt), dtype=np.int64)[None, :]
    out = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, eos_id=tokenizer.eot_id, seed=args.seed, use_cache=not args.no_cache)
    print(tokenizer.decode(out[0]))
    return 0


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def given_flags(argv) -> set[str]:
    """The destinations of the flags actually written in `argv` (not left at their defaults):
    `train --resume` keeps the run's own value of every flag not given."""
    parser = build_parser()
    for action in parser._actions:
        for sub in (getattr(action, "choices", None) or {}).values():
            if isinstance(sub, argparse.ArgumentParser):
                for a in sub._actions:
                    a.default = argparse.SUPPRESS
                sub._defaults.clear()
    try:
        return set(vars(parser.parse_args(argv))) - {"command"}
    except SystemExit:
        return set()


def main(argv=None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input, 130 interrupted by Ctrl-C, 143 by
    SIGTERM; an interrupted `train` first saves a checkpoint to resume from)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:   # --help (0) or an argparse error (2, message already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    args.given = given_flags(argv)
    try:
        return int(args.func(args) or 0)
    except (GPT2Error, mg.BackendError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory; try a smaller --batch-size, --context-length or model",
              file=sys.stderr)
        return 2
    except OSError as exc:   # e.g. no permission to write --out
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


