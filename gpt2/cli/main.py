"""The command line: `python -m gpt2 prepare | train | generate | bench | selftest`.

A thin layer over functions a user could call from Python: it parses flags, checks them, calls
the library (gpt2.prepare, gpt2.train, gpt2.checkpoint, gpt2.generate, ...), and turns our own
errors (GPT2Error, minigrad's BackendError) into one line on stderr, `error: ...`, exit code 2.

Here: the parser and `main`. Each command is a module of this package with `add_arguments(p)`
and `run(args)`: prepare.py, train.py (its flags in train_flags.py, its run directory in
run_saver.py, its ranks under mpiexec in ranks.py), generate.py, bench.py, selftest.py.

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

import minigrad as mg

from ..errors import GPT2Error
from . import bench, generate, prepare, selftest, train, train_flags
from .flags import PROG, one_line


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


# Each command: (name, module with run(args), function adding its flags, help, description).
COMMANDS = (
    ("prepare", prepare, prepare.add_arguments, "tokenize a corpus into a prepared dataset",
     "Tokenize UTF-8 text (files, folders, or a named dataset: verdict, shakespeare) into a prepared "
     "dataset folder for `train --data`: token ids in binary shards, a train/validation split and a "
     "manifest.json. Streams the text (any size) and uses several processes for large inputs."),
    ("train", train, train_flags.add_arguments,
     "train a GPT-2 from scratch on a text file or a prepared dataset",
     "Train a GPT-2 from scratch. The defaults are the course run of chapter 05 (LLMs from Scratch, "
     "chapter 5): the 124M shape with context 256, dropout 0.1, no qkv bias and an untied output head, "
     "AdamW lr 4e-4 and weight decay 0.1, batch 2, 10 epochs, seed 123, on The Verdict."),
    ("generate", generate, generate.add_arguments, "continue a prompt with a trained model",
     "Continue a prompt with a checkpoint from `train`, or with OpenAI's pretrained weights. "
     "Temperature 0 is greedy decoding."),
    ("bench", bench, bench.add_arguments, "time training steps and generation", None),
    ("selftest", selftest, selftest.add_arguments, "check this machine's GPU (or CPU) end to end",
     "The acceptance run for a GPU: kernels against their NumPy twins, float64 gradient checks, a short "
     "course-model training run, generation with and without the KV cache, the benchmark and pytest's "
     "CuPy half; exit code 1 if any fails."),
)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; `parser.commands` maps each command's name to its subparser."""
    parser = _Parser(
        prog=PROG, description="GPT-2 from scratch on minigrad: prepare data, train, generate, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{" + ",".join(c[0] for c in COMMANDS) + "}")
    parser.commands = {}
    for name, module, add_arguments, help_, description in COMMANDS:
        p = sub.add_parser(name, formatter_class=_Help, help=help_, description=description)
        add_arguments(p)
        p.set_defaults(func=module.run)
        parser.commands[name] = p
    return parser


_NOT_GIVEN = object()   # a default no command line can produce


def given_flags(argv) -> set[str]:
    """The destinations of the flags actually written in `argv` (not left at their defaults):
    `train --resume` keeps the run's own value of every flag not given. Parsed twice: the second
    time with every default of the command replaced by a marker that no flag's value can equal."""
    parser = build_parser()
    try:
        every = vars(parser.parse_args(argv))
        parser.commands[every["command"]].set_defaults(**dict.fromkeys(every, _NOT_GIVEN))
        given = vars(parser.parse_args(argv))
    except SystemExit:
        return set()
    return {dest for dest, value in given.items() if value is not _NOT_GIVEN} - {"command"}


def main(argv=None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input, 130 interrupted by Ctrl-C, 143 by
    SIGTERM; an interrupted `train` first saves a checkpoint to resume from)."""
    mg.backend.tune_malloc()   # a training step's few GB of temporaries reused, not re-mapped each step
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


