"""The `train` command's flags: what they are, the model and training-loop configs they
describe, that their values make sense (checked before anything slow happens), and which of
them a resumed run may change.

A resumed run (`train --resume DIR`) takes the saved run's own settings: it must rebuild the
same model, data and schedule to continue exactly. Only RESUME_MAY_CHANGE may differ.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..config import COURSE, MODEL_SIZES, GPTConfig, config_for
from ..errors import GPT2Error
from ..train import TrainConfig
from .flags import PROG, default_backend, flag_name, require_finite, require_positive

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
    t.add_argument("--epochs", type=int, default=10, metavar="N", help="passes over the training data")
    t.add_argument("--max-steps", "--max-iters", type=int, default=None, metavar="N",
                   help="stop after N optimizer steps (default: no limit)")
    t.add_argument("--batch-size", type=int, default=2, metavar="N", help="windows per step (per rank "
                   "under mpiexec: the global batch is ranks x N)")
    t.add_argument("--zero", type=int, choices=[0, 1], default=0, metavar="{0,1}",
                   help="1: shard AdamW's moments across the ranks (ZeRO-1; needs mpiexec -n 2 or more)")
    t.add_argument("--lr", "--learning-rate", type=float, default=4e-4, metavar="X",
                   help="AdamW learning rate (peak "
                   "learning rate with --warmup-steps)")
    t.add_argument("--weight-decay", type=float, default=0.1, metavar="X",
                   help="AdamW decoupled weight decay (on every parameter as in the book, unless "
                   "--no-decay-all)")
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
    t.add_argument("--grad-clip", type=float, default=None, metavar="X",
                   help="clip the global gradient norm to X (default: no clipping)")
    t.add_argument("--eval-every", "--eval-interval", type=int, default=5, metavar="N",
                   help="print train and val loss every N steps (the log's Step 0 is the first step, as the "
                   "book counts; checkpoint ckpt-N holds the weights after N steps)")
    t.add_argument("--eval-iter", "--eval-iters", type=int, default=5, metavar="N",
                   help="batches of each loader averaged per evaluation (random batches for a prepared "
                   "dataset)")
    t.add_argument("--keep-best", action="store_true",
                   help="also keep the checkpoint with the lowest validation loss so far, as --out/best")
    t.add_argument("--sample-prompt", default=None, metavar="TEXT",
                   help="prompt continued (greedily, 50 tokens) after each epoch; '' to skip (default: "
                   f"\"{DEFAULT_SAMPLE_PROMPT}\" for a text file; the first line of a prepared dataset)")
    t.add_argument("--seed", type=int, default=123, metavar="N",
                   help="seed for weights, dropout and the shuffle order")
    t.add_argument("--backend", choices=["numpy", "cupy"], default=default_backend(),
                   help="numpy (CPU) or cupy (NVIDIA GPU) (default: $MINIGRAD_BACKEND, else numpy)")
    t.add_argument("--out", metavar="DIR", default="runs/train",
                   help="run directory for the checkpoints (ckpt-<step>/, `latest`) and loss.png")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a checkpoint already in --out (otherwise that is an error)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = p.add_argument_group("checkpoints and resuming")
    r.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run saved in DIR (a run directory: its `latest` checkpoint; or one "
                   "ckpt-<step> directory) exactly where it stopped, with its settings; only --epochs, "
                   "--max-steps, --lr, --grad-clip, --eval-every, --eval-iter, --sample-prompt, "
                   "--save-every, --keep, --keep-best, --skip-nonfinite, --backend, --data (same "
                   "contents), --zero and --no-progress may be changed; the number of ranks may change too")
    r.add_argument("--save-every", type=int, default=100, metavar="N",
                   help="save a checkpoint every N steps (and always at the end and on Ctrl-C)")
    r.add_argument("--keep", type=int, default=2, metavar="N",
                   help="keep the newest N checkpoints in --out, deleting older ones")
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
    if not args.lr > 0:
        raise GPT2Error(f"--lr must be > 0, got {args.lr}")
    if args.weight_decay < 0:
        raise GPT2Error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.grad_clip is not None and not args.grad_clip > 0:
        raise GPT2Error(f"--grad-clip must be > 0, got {args.grad_clip}")
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
def resumed_args(args, ckpt_dir: Path, trainer_state: dict | None):
    """The flags of the run saved in `ckpt_dir`, with the ones this command changes on top.

    A flag left at its default takes the run's value; a flag given with another value is an
    error unless it is one of RESUME_MAY_CHANGE (a resumed run must rebuild the same model, data
    and schedule to continue exactly)."""
    run = (trainer_state or {}).get("run")
    if not isinstance(trainer_state, dict) or "loader" not in trainer_state or not isinstance(run, dict):
        raise GPT2Error(f"{ckpt_dir} was not saved by `{PROG} train` (it has no run settings or data loader "
                        "position), so it cannot be resumed; it can still be used with generate --checkpoint")
    defaults = _defaults()
    explicit = getattr(args, "given", None)   # the flags on the command line (set by cli.main)
    merged = argparse.Namespace(**vars(args))
    changes = []
    for key in defaults:
        if key not in run:
            continue                      # saved by an older version: this command's value
        saved = run[key]
        if not _could_be_given(key, saved, defaults[key]):
            raise GPT2Error(f"{ckpt_dir}/trainer_state.json: the run setting {key} has an invalid value "
                            f"{str(saved)[:40]} (the checkpoint is damaged)")
        given = getattr(args, key)
        left_out = key not in explicit if explicit is not None else given == defaults[key]
        if left_out or given == saved:
            setattr(merged, key, saved)
        elif key in RESUME_MAY_CHANGE:
            changes.append(f"{flag_name(key)} {given} (was {saved})")
        else:
            raise GPT2Error(f"{flag_name(key)} {given} differs from the run being resumed ({saved}); a "
                            f"resumed run keeps its model, data, batch size, seed and schedule: leave "
                            f"{flag_name(key)} out, or start a new run with another --out")
    return merged, changes


class _StrictParser(argparse.ArgumentParser):
    """The train flags alone, raising ValueError on a bad value instead of printing and exiting."""

    def error(self, message):
        raise ValueError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _StrictParser(add_help=False)
    add_arguments(parser)
    return parser


def _defaults() -> dict:
    """Every train flag's default (what `train` alone parses to)."""
    return vars(_parser().parse_args([]))


def _could_be_given(key: str, saved, default) -> bool:
    """Whether a saved run setting is a value the flag `key` can take: the type of its default,
    or (a flag whose default is None) the same value back when parsed from the command line."""
    if saved is None or saved == default:
        return True
    if isinstance(default, bool) or isinstance(saved, bool):
        return isinstance(saved, bool) and isinstance(default, bool)
    if isinstance(default, (int, float, str)):
        return isinstance(saved, type(default)) or (isinstance(default, float) and isinstance(saved, int))
    try:
        return vars(_parser().parse_args([flag_name(key), str(saved)]))[key] == saved
    except ValueError:
        return False
