"""The command line: `python -m gpt2 prepare | train | finetune | generate | chat | eval | bench | selftest`.

A thin layer over functions a user could call from Python: it parses flags, checks them, calls
the library (gpt2.prepare, gpt2.train, gpt2.checkpoint, gpt2.generate, ...), and turns our own
errors (GPT2Error, minigrad's BackendError) into one line on stderr, `error: ...`, exit code 2.

Here: the parser and `main`. Each command is a module of this package with `add_arguments(p)`
and `run(args)`: prepare.py, train.py (its flags in train_flags.py, its run directory in
run_saver.py, its ranks under mpiexec in ranks.py), finetune.py, generate.py, chat.py, eval.py,
bench.py, selftest.py.

Flags are forgiving where that is safe: nanoGPT's spellings work (`--n_layer=4` is `--n-layer 4`:
underscores in a flag's name are read as hyphens), and an unknown flag is answered with the
command's closest flags ("did you mean --max-steps?") and a pointer to that command's --help.

    python -m gpt2 train --out runs/verdict                       # the course run (chapter 05)
    python -m gpt2 train --resume runs/verdict                    # continue it after Ctrl-C or a crash
    python -m gpt2 generate --checkpoint runs/verdict --prompt "Every effort moves you"
    python -m gpt2 finetune classify --pretrained gpt2 --out runs/classify      # the book's chapter 6
    python -m gpt2 prepare shakespeare --tokenizer char --out data/shakespeare_char
    python -m gpt2 train --data data/shakespeare_char ...                # see README: Shakespeare
    mpiexec -n 2 python -m gpt2 train --batch-size 1               # data parallel: 2 ranks x batch 1
"""

from __future__ import annotations

import argparse
import difflib
import sys

import minigrad as mg
from minigrad import distributed

from ..errors import GPT2Error
from . import bench, chat, finetune, generate, prepare, selftest, train, train_flags
from . import eval as eval_
from .flags import PROG, one_line, version


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
    ("finetune", finetune, finetune.add_arguments,
     "fine-tune a GPT-2: classify spam, follow instructions, DPO",
     "Fine-tune OpenAI's GPT-2 (--pretrained) or a checkpoint of ours (--checkpoint) as LLMs from Scratch "
     "does, on the training loop of `train`: classify (chapter 6: SMS spam, a new 2-class head, the last "
     "block trained, or LoRA), instruct (chapter 7: Alpaca-formatted instructions, then the test set's "
     "responses) or dpo (chapter 7's DPO notebook: chosen over rejected answers, against a frozen "
     "reference). The defaults are the book's for each task; --resume continues a run exactly."),
    ("generate", generate, generate.add_arguments, "continue a prompt with a trained model",
     "Continue a prompt with a checkpoint from `train`, or with OpenAI's pretrained weights; the tokens "
     "are printed as they are made. Temperature 0 is greedy decoding."),
    ("chat", chat, chat.add_arguments, "talk to a model, turn by turn",
     "An interactive session with a checkpoint or OpenAI's weights: each line you type is answered. "
     "A model whose tokenizer.json names a prompt template (e.g. \"prompt_template\": \"alpaca\") is "
     "prompted with it and remembers the conversation; any other model continues your text. "
     "/quit or end of input (Ctrl-D) ends it."),
    ("eval", eval_, eval_.add_arguments, "loss, perplexity and bits per byte of a model on some text",
     "Evaluate a checkpoint (or OpenAI's weights) on a UTF-8 text file or a prepared dataset's split: "
     "the mean next-token loss in nats, its perplexity exp(loss), and bits per byte (total nats / "
     "(ln 2 x UTF-8 bytes of the text)), which compares models with different tokenizers."),
    ("bench", bench, bench.add_arguments, "time training steps and generation", None),
    ("selftest", selftest, selftest.add_arguments, "check this machine's GPU (or CPU) end to end",
     "The acceptance run for a GPU: kernels against their NumPy twins, float64 gradient checks, a short "
     "course-model training run, generation with and without the KV cache, the benchmark and pytest's "
     "CuPy half; exit code 1 if any fails."),
)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; `parser.commands` maps each command's name to its subparser."""
    parser = _Parser(
        prog=PROG, description="GPT-2 from scratch on minigrad: prepare data, train, fine-tune, generate, "
        "chat, evaluate, benchmark.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
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


def _command_of(parser, argv) -> str | None:
    """The command named in `argv` (its first word that is one), or None."""
    return next((a for a in argv if a in parser.commands), None)


def _options(subparser) -> list[str]:
    return [s for action in subparser._actions for s in action.option_strings if s.startswith("--")]


def normalize_argv(parser, argv: list[str]) -> list[str]:
    """nanoGPT's spellings: `--n_layer=4` -> `--n-layer=4` (underscores in a flag's name become
    hyphens when that names one of the command's flags). Values and everything after `--` stay."""
    command = _command_of(parser, argv)
    if command is None:
        return argv
    known = set(_options(parser.commands[command]))
    out, after_dashes = [], False
    for a in argv:
        if a == "--":
            after_dashes = True
        if not after_dashes and a.startswith("--") and "_" in a.split("=", 1)[0]:
            name, eq, value = a.partition("=")
            hyphened = name.replace("_", "-")
            if name not in known and hyphened in known:
                a = hyphened + eq + value
        out.append(a)
    return out


def _unknown_flags_error(parser, argv: list[str], extras: list[str]) -> str:
    """One line for arguments no flag of the command takes: the closest flags, and its --help."""
    command = _command_of(parser, argv)
    where = f"{PROG} {command} --help" if command else f"{PROG} --help"
    flags = [e.split("=", 1)[0] for e in extras if e.startswith("-")]
    if not flags:
        return f"error: unexpected argument(s): {' '.join(extras)} (see {where})"
    options = _options(parser.commands[command]) if command else []
    hints = []
    for flag in flags:
        name = flag.lstrip("-")
        close = ["--" + c for c in difflib.get_close_matches(name, [o[2:] for o in options], n=2, cutoff=0.7)]
        close += [o for o in options if len(name) > 3 and name in o and o not in close]
        if close:
            hints.append(f"did you mean {' or '.join(close[:2])}?")
    what = f"{command} has no flag {', '.join(flags)}" if command else f"unknown flag {', '.join(flags)}"
    return f"error: {what}{'; ' + ' '.join(hints) if hints else ''} (see {where})"


def check_environment() -> None:
    """The environment variables minigrad reads, checked before any command runs: a bad one is
    the one-line error (exit code 2) naming it and the fix, not a traceback."""
    if mg.backend.env_error is not None:
        raise mg.backend.env_error
    try:
        distributed.default_timeout()
        mg.parallel.num_threads()   # MINIGRAD_NUM_THREADS, OMP_NUM_THREADS, OPENBLAS_NUM_THREADS
    except (distributed.DistributedError, ValueError) as exc:
        raise GPT2Error(str(exc)) from None


def main(argv=None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input, 130 interrupted by Ctrl-C, 143 by
    SIGTERM; an interrupted `train` first saves a checkpoint to resume from)."""
    mg.backend.tune_malloc()   # a training step's few GB of temporaries reused, not re-mapped each step
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    argv = normalize_argv(parser, argv)
    try:
        args, extras = parser.parse_known_args(argv)
    except SystemExit as exc:   # --help (0) or an argparse error (2, message already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if extras:
        if distributed.launched_rank() == 0:   # under mpiexec rank 0 reports for all
            print(_unknown_flags_error(parser, argv, extras), file=sys.stderr)
        return 2
    args.given = given_flags(argv)
    try:
        check_environment()
        return int(args.func(args) or 0)
    except (GPT2Error, mg.BackendError, distributed.DistributedError) as exc:
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


