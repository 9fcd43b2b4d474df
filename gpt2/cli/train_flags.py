"""The `train` command's flags: what they are, the model and training-loop configs they
describe, that their values make sense (checked before anything slow happens), and which of
them a resumed run may change.

A resumed run (`train --resume DIR`) takes the saved run's own settings: it must rebuild the
same model, data and schedule to continue exactly. Only RESUME_MAY_CHANGE may differ.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import COURSE, MODEL_SIZES, GPTConfig, config_for
from ..errors import GPT2Error
from ..train import TrainConfig
from .flags import (
    PROG,
    StrictParser,
    add_flag,
    check_optimizer_flags,
    flag_name,
    require_finite,
    require_positive,
)

DEFAULT_SAMPLE_PROMPT = "Every effort moves you"   # The Verdict's first words, as in the book


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="FILE_OR_DIR", default=None,
                   help="a UTF-8 text file (GPT-2 tokens, windows in order, 90/10 split by characters), or a "
                   "dataset folder made by `prepare` (its tokenizer; random windows) (default: The Verdict, "
                   "downloaded into data/ on first use)")
    p.add_argument("--model", choices=list(MODEL_SIZES), default="gpt2-124m",
                   help="the GPT-2 shape (layers, heads, width); the flags below override parts of it")
    g = p.add_argument_group("model overrides")
    g.add_argument("--context-length", "--block-size", type=int, default=COURSE["context_length"],
                   metavar="N",
                   help="tokens per training window (at most the size's 1024)")
    g.add_argument("--n-layers", "--n-layer", type=int, default=None, metavar="N", help="transformer blocks "
                   "(default: the --model size's)")
    g.add_argument("--n-heads", "--n-head", type=int, default=None, metavar="N", help="attention heads "
                   "(default: the --model size's)")
    g.add_argument("--emb-dim", "--n-embd", type=int, default=None, metavar="N",
                   help="embedding width, divisible by --n-heads (default: the --model size's)")
    g.add_argument("--dropout", type=float, default=COURSE["dropout"], metavar="P",
                   help="dropout probability in [0, 1)")
    g.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, default=COURSE["qkv_bias"],
                   help="biases on the query/key/value projection (default: off)")
    g.add_argument("--tie-embeddings", "--tie", action=argparse.BooleanOptionalAction,
                   default=COURSE["tie_embeddings"],
                   help="share the token embedding with the output head (default: untied)")
    g.add_argument("--init", choices=["book", "gpt2"], default="book",
                   help="weight initialisation: book = PyTorch's layer defaults, as LLMs from Scratch "
                   "(the course run); gpt2 = GPT-2's normal(0, 0.02), better with warmup and a tied head")
    t = p.add_argument_group("training")
    add_flag(t, "epochs", 10)
    add_flag(t, "max_steps")
    add_flag(t, "batch_size", 2,
             help="windows per step (per rank under mpiexec: the global batch is ranks x N)")
    t.add_argument("--zero", type=int, choices=[0, 1], default=0, metavar="{0,1}",
                   help="1: shard AdamW's moments across the ranks (ZeRO-1; needs mpiexec -n 2 or more)")
    add_flag(t, "lr", 4e-4, extra="(peak learning rate with --warmup-steps)")
    add_flag(t, "weight_decay", 0.1, extra="(on every parameter as in the book, unless --no-decay-all)")
    t.add_argument("--decay-all", action=argparse.BooleanOptionalAction, default=True,
                   help="weight decay on every parameter (the book); --no-decay-all: only on matrices, "
                   "not biases and LayerNorm (GPT-2, nanoGPT)")
    t.add_argument("--beta2", type=float, default=0.999, metavar="X",
                   help="AdamW's second-moment decay (nanoGPT uses 0.99 for small models)")
    t.add_argument("--grad-accum", type=int, default=1, metavar="N",
                   help="accumulate the gradients of N batches per optimizer step (the same update as one "
                   "batch N times larger, in the memory of one)")
    t.add_argument("--warmup-steps", "--warmup-iters", type=int, default=None, metavar="N",
                   help="linear warmup over N steps, then cosine decay reaching --min-lr at the run's last "
                   "step (default: constant lr)")
    t.add_argument("--min-lr", type=float, default=None, metavar="X",
                   help="learning rate at the end of the cosine decay (default: --lr / 10)")
    add_flag(t, "grad_clip")
    add_flag(t, "eval_every", 5)
    add_flag(t, "eval_iter", 5, extra="(random batches for a prepared dataset)")
    t.add_argument("--keep-best", action="store_true",
                   help="also keep the checkpoint with the lowest validation loss so far, as --out/best")
    t.add_argument("--sample-prompt", default=None, metavar="TEXT",
                   help="prompt continued (greedily, 50 tokens) after each epoch; '' to skip (default: "
                   f"\"{DEFAULT_SAMPLE_PROMPT}\" for a text file; the first line of a prepared dataset)")
    add_flag(t, "seed", 123)
    add_flag(t, "backend")
    add_flag(t, "out", "runs/train")
    add_flag(t, "overwrite")
    add_flag(t, "no_progress")
    r = p.add_argument_group("checkpoints and resuming")
    add_flag(r, "resume", extra="; only --epochs, --max-steps, --lr, --grad-clip, --eval-every, --eval-iter, "
             "--sample-prompt, --save-every, --keep, --keep-best, --skip-nonfinite, --backend, --data (same "
             "contents), --zero and --no-progress may be changed; the number of ranks may change too")
    add_flag(r, "save_every", 100)
    add_flag(r, "keep", 2)
    r.add_argument("--skip-nonfinite", action="store_true",
                   help="skip a step whose loss or gradient is NaN/inf instead of stopping")


def config_from_args(args, vocab_size: int | None = None) -> GPTConfig:
    """The GPTConfig that the train flags describe (with the dataset's vocabulary size, if given)."""
    for flag in ("context_length", "n_layers", "n_heads", "emb_dim"):
        require_positive(flag_name(flag), getattr(args, flag), allow_none=True)
    base = config_for(args.model)
    if args.context_length > base.context_length:
        raise GPT2Error(f"--context-length {args.context_length} is larger than {args.model}'s "
                        f"{base.context_length} positions")
    require_finite("--dropout", args.dropout)
    if not 0.0 <= args.dropout < 1.0:
        raise GPT2Error(f"--dropout must be in [0, 1), got {args.dropout}")
    overrides = dict(context_length=args.context_length, dropout=args.dropout, qkv_bias=args.qkv_bias,
                     tie_embeddings=args.tie_embeddings)
    for flag in ("n_layers", "n_heads", "emb_dim"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    try:
        return config_for(args.model, **overrides)
    except GPT2Error as exc:   # the config's own check, in the words of the flags
        raise GPT2Error(flag_words(str(exc), args.model)) from None


_FLAG_OF_FIELD = {"emb_dim": "--emb-dim", "n_heads": "--n-heads", "n_layers": "--n-layers",
                  "context_length": "--context-length", "dropout": "--dropout", "vocab_size": "--vocab-size"}


def flag_words(message: str, model: str) -> str:
    """A GPTConfig message with its field names as the train flags that set them, e.g.
    "--emb-dim (60) must be divisible by --n-heads (7)"."""
    def flag(m):
        return _FLAG_OF_FIELD[m.group(0)]
    text = re.sub(r"\b(" + "|".join(_FLAG_OF_FIELD) + r")\b", flag, message)
    return text + f" (--model {model} sets the sizes you do not give)" if "--" in text else text


def loop_config_from_args(args, eval_final: bool) -> TrainConfig:
    """The TrainConfig of the training loop that the train flags describe."""
    return TrainConfig(epochs=args.epochs, max_steps=args.max_steps, eval_every=args.eval_every,
                       eval_iter=args.eval_iter, grad_clip=args.grad_clip, warmup_steps=args.warmup_steps,
                       sample_prompt=args.sample_prompt or None, progress=not args.no_progress,
                       skip_nonfinite=args.skip_nonfinite, grad_accum=args.grad_accum, min_lr=args.min_lr,
                       eval_final=eval_final)


def check_args(args, world_size: int) -> GPTConfig:
    """Every train flag checked, one clear GPT2Error for the first bad one; returns the model's
    GPTConfig (its vocabulary is GPT-2's until the data says otherwise)."""
    config = config_from_args(args)
    for flag in ("epochs", "batch_size", "eval_every", "eval_iter", "save_every", "keep", "grad_accum"):
        require_positive(flag_name(flag), getattr(args, flag))
    require_positive("--max-steps", args.max_steps, allow_none=True)
    for flag in ("lr", "weight_decay", "grad_clip", "min_lr", "beta2"):
        require_finite(flag_name(flag), getattr(args, flag))
    check_optimizer_flags(args)
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise GPT2Error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.min_lr is not None:
        if args.warmup_steps is None:
            raise GPT2Error("--min-lr is where the cosine schedule ends, so it needs --warmup-steps N "
                            "(0 for no warmup); without it the learning rate is constant")
        if not 0 <= args.min_lr <= args.lr:
            raise GPT2Error(f"--min-lr must be between 0 and --lr ({args.lr:g}), got {args.min_lr:g}")
    if not 0 <= args.beta2 < 1:
        raise GPT2Error(f"--beta2 must be in [0, 1), e.g. 0.99 or 0.999, got {args.beta2}")
    if args.seed < 0:
        raise GPT2Error(f"--seed must be an integer >= 0, got {args.seed}")
    if args.zero and world_size == 1:
        raise GPT2Error("--zero 1 shards the optimizer state across ranks and this run has one; start it "
                        f"with mpiexec -n 2 (or more) {PROG} train ..., or leave --zero out")
    return config


# ---------------------------------------------------------------------------------------------
# Resuming: the run's own settings, with the few this command may change
# ---------------------------------------------------------------------------------------------

# What a resumed run may change; every other setting is the run's own (see resumed_args).
RESUME_MAY_CHANGE = ("epochs", "max_steps", "lr", "grad_clip", "eval_every", "eval_iter", "sample_prompt",
                     "save_every", "keep", "keep_best", "skip_nonfinite", "backend", "no_progress", "data",
                     "zero")


@dataclass
class Resume:
    """The run that --resume continues (train's and finetune's)."""
    ckpt_dir: Path        # the checkpoint it continues from
    trainer_state: dict   # that checkpoint's trainer_state.json
    changes: list[str]    # the settings this command changes, e.g. "--lr 0.0001 (was 0.0004)"
    ckpt: object = None   # the loaded gpt2.checkpoint.Checkpoint, once a command has read it

    def say_where(self, train_loader, state, steps: int) -> None:
        """The line a resumed run prints before training: from which checkpoint, where in the data,
        what this command changed; and a note if the run has nothing left to do."""
        print(f"resuming {self.ckpt_dir} at step {state.step} (epoch {train_loader.epoch + 1}, batch "
              f"{train_loader.batch_index + 1} of {len(train_loader)})"
              + (f"; changed: {', '.join(self.changes)}" if self.changes else ""))
        if state.step >= steps:
            print(f"the run has already done its {steps} steps; pass a larger --epochs or --max-steps "
                  "to train further")


def resumed_args(args, ckpt_dir: Path, trainer_state: dict | None, *, command: str = "train",
                 parse=None, may_change=RESUME_MAY_CHANGE):
    """The flags of the run saved in `ckpt_dir`, with the ones this command changes on top.

    A flag left at its default takes the run's value; a flag given with another value is an
    error unless it is one of `may_change` (a resumed run must rebuild the same model, data
    and schedule to continue exactly). `command` is the command resuming (train, finetune: a
    run records the one that saved it, train's by saying nothing) and `parse(argv)` its flags'
    strict parser (a dict of values; default: train's)."""
    run = (trainer_state or {}).get("run")
    if not isinstance(trainer_state, dict) or "loader" not in trainer_state or not isinstance(run, dict):
        raise GPT2Error(f"{ckpt_dir} was not saved by `{PROG} {command}` (it has no run settings or data "
                        "loader position), so it cannot be resumed; it can still be used with generate "
                        "--checkpoint")
    saved_by = run.get("command", "train")
    if saved_by != command:
        raise GPT2Error(f"{ckpt_dir} is a run of `{PROG} {saved_by}`, not of `{PROG} {command}`; resume it "
                        f"with `{PROG} {saved_by}" + (" TASK" if saved_by == "finetune" else "")
                        + f" --resume {ckpt_dir}`")
    parse = parse or (lambda argv: vars(_parser().parse_args(argv)))
    defaults = parse([])
    explicit = getattr(args, "given", None)   # the flags on the command line (set by cli.main)
    merged = argparse.Namespace(**vars(args))
    changes = []
    for key in defaults:
        if key not in run:
            continue                      # saved by an older version: this command's value
        saved = run[key]
        if not _could_be_given(key, saved, defaults[key], parse):
            raise GPT2Error(f"{ckpt_dir}/trainer_state.json: the run setting {key} has an invalid value "
                            f"{str(saved)[:40]} (the checkpoint is damaged)")
        given = getattr(args, key)
        left_out = key not in explicit if explicit is not None else given == defaults[key]
        if left_out or given == saved:
            setattr(merged, key, saved)
        elif key in may_change:
            changes.append(f"{flag_name(key)} {given} (was {saved})")
        else:
            raise GPT2Error(f"{flag_name(key)} {given} differs from the run being resumed ({saved}); a "
                            f"resumed run keeps its model, data, batch size, seed and schedule: leave "
                            f"{flag_name(key)} out, or start a new run with another --out")
    return merged, changes


def _parser() -> argparse.ArgumentParser:
    parser = StrictParser(add_help=False)   # the train flags alone
    add_arguments(parser)
    return parser


def _could_be_given(key: str, saved, default, parse) -> bool:
    """Whether a saved run setting is a value the flag `key` can take: the type of its default,
    or (a flag whose default is None) the same value back when parsed from the command line."""
    if saved is None or saved == default:
        return True
    if isinstance(default, bool) or isinstance(saved, bool):   # (None: an on/off flag of a task's default)
        return isinstance(saved, bool) and (isinstance(default, bool) or default is None)
    if isinstance(default, (int, float, str)):
        return isinstance(saved, type(default)) or (isinstance(default, float) and isinstance(saved, int))
    try:
        return parse([flag_name(key), str(saved)])[key] == saved
    except ValueError:
        return False
