"""`python -m gpt2 finetune classify|instruct|dpo`: fine-tune a GPT-2 the book's way, on the
training loop of pretraining, with checkpoints to resume from.

The work is the library's (gpt2/finetune: adapt.py prepares the model, tasks.py holds the three
tasks); this module reads the flags and calls it, in the order the steps happen (`run`):

  0. resuming: the saved run's own settings, with the few this command may change
  1. every flag checked before anything slow happens; the run directory; the backend
  2. the model: --pretrained or --checkpoint (or the run's own checkpoint), its dropout, and
     for DPO the frozen reference
  3. the task: its data, loss and evaluation; a new classifier head; LoRA; what trains
  4. training (gpt2/train.py), a checkpoint every --save-every steps, at the end and on Ctrl-C
  5. the end (the task's): final numbers, plots, test-set responses, results.json
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
from pathlib import Path

import minigrad as mg
from minigrad import distributed

from .. import checkpoint as ck
from .. import pretrained, safeio
from ..errors import GPT2Error
from ..finetune import adapt
from ..finetune.tasks import BOOK_DEFAULTS, OUTPUTS, RESULTS_FILE, TASKS, make_task
from ..resume import restore_training
from ..tokenizer import Tokenizer, get_tokenizer
from ..train import History, NonFiniteError, TrainConfig, TrainState, make_optimizer, total_steps
from ..train import train as run_training
from .flags import (
    PROG,
    StrictParser,
    add_flag,
    check_optimizer_flags,
    flag_name,
    require_finite,
    require_positive,
    use_backend,
)
from .run_saver import RunSaver, check_out_dir, check_resume_out, clear_out_dir, run_dir_of
from .train import graceful_stop, nonfinite_error
from .train_flags import Resume, resumed_args

# What a resumed run may change; every other setting is the run's own.
RESUME_MAY_CHANGE = ("epochs", "max_steps", "lr", "grad_clip", "eval_every", "eval_iter", "save_every",
                     "keep", "backend", "no_progress", "data", "cache_dir", "responses", "max_new_tokens")
_TASK_ONLY = {"mask_prompt": ("instruct", "dpo"), "beta": ("dpo",), "responses": ("instruct", "dpo"),
              "max_new_tokens": ("instruct", "dpo")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=TASKS,
                   help="classify: spam or not, SMS messages (the book's chapter 6); instruct: follow "
                   "instructions, Alpaca format (chapter 7); dpo: prefer the chosen answers over the "
                   "rejected ones (chapter 7's DPO notebook)")
    src = p.add_argument_group("the model to fine-tune (one of)")
    src.add_argument("--pretrained", metavar="NAME_OR_DIR",
                     help="OpenAI's GPT-2 weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl (fetched through "
                     "huggingface_hub into the Hugging Face cache where it is installed, else downloaded "
                     "directly into our cache), or a directory in the Hugging Face layout")
    src.add_argument("--checkpoint", metavar="DIR",
                     help="a checkpoint of ours (from train or finetune; a run directory: its latest); "
                     "one with LoRA is merged first")
    add_flag(src, "resume", extra="; only " + ", ".join(flag_name(k) for k in RESUME_MAY_CHANGE[:-1])
             + f" and {flag_name(RESUME_MAY_CHANGE[-1])} may be changed (--data: the same contents)")
    src.add_argument("--cache-dir", metavar="DIR", default=None,
                     help="our cache for --pretrained NAME (default $GPT2_CACHE, else "
                     "~/.cache/minigrad-gpt2): a name missing there is downloaded directly into it, not "
                     "through huggingface_hub")
    d = p.add_argument_group("data")
    d.add_argument("--data", metavar="FILE", default=None,
                   help="the task's data file, a copy of the book's (default: SMSSpamCollection, "
                   "instruction-data.json or instruction-data-with-preference.json in data/finetune/, "
                   "downloaded on first use and checked by SHA-256)")
    d.add_argument("--max-length", type=int, default=None, metavar="N",
                   help="cut every example to N tokens (default: classify: the longest training message, "
                   "120 tokens; instruct and dpo: the model's context length, 1024 for GPT-2)")
    d.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="instruct and dpo: no loss on the prompt's tokens (default: instruct off, as the "
                   "book's chapter 7; dpo on, as its notebook)")
    m = p.add_argument_group("what trains")
    m.add_argument("--trainable", choices=["last-block", "all"], default=None,
                   help="last-block: the last transformer block, the final norm and the head; all: every "
                   "parameter (default: classify last-block, as the book; instruct and dpo all)")
    m.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="train LoRA updates of rank R instead, every pretrained weight frozen (a new "
                   "classifier head trains whole); the book's appendix E uses 16")
    m.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                   help="LoRA's alpha: the update is scaled by alpha / rank (default: the rank; the "
                   "book: 16)")
    m.add_argument("--lora-targets", default=None, metavar="LAYERS",
                   help="the Linear layers LoRA adapts: blocks (the four of every block), all (those and "
                   "the head, the book's appendix E: the new head then stays frozen but for its LoRA "
                   "update), or a comma-separated list of attn.qkv, attn.proj, mlp.fc, mlp.proj, head "
                   "(default: blocks)")
    m.add_argument("--dropout", type=float, default=0.0, metavar="P",
                   help="dropout probability while fine-tuning (the book: 0)")
    t = p.add_argument_group("training (the defaults are the book's for each task)")
    add_flag(t, "epochs", extra="(default: classify 5, instruct 2, dpo 1)")
    add_flag(t, "max_steps")
    add_flag(t, "batch_size", 8, help="examples per optimizer step (dpo: preference pairs)")
    add_flag(t, "lr", extra="(default: classify and instruct 5e-05, dpo 5e-06)")
    add_flag(t, "weight_decay", extra="on every trainable parameter (default: classify and instruct 0.1, "
             "dpo 0.01)")
    add_flag(t, "grad_clip")
    add_flag(t, "eval_every", extra="(default: classify 50, instruct and dpo 5)")
    add_flag(t, "eval_iter", 5)
    t.add_argument("--beta", type=float, default=None, metavar="X",
                   help="dpo: how far the policy may move from the reference for a given gain (default: 0.1)")
    add_flag(t, "seed", 123, extra="(and a new classifier head's)")
    add_flag(t, "backend")
    o = p.add_argument_group("output and checkpoints")
    add_flag(o, "out", help="run directory: the checkpoints (ckpt-<step>/, `latest`), loss.png, "
             "results.json, and the task's plots and responses (default: runs/TASK)")
    add_flag(o, "overwrite")
    add_flag(o, "no_progress")
    add_flag(o, "save_every", 100)
    add_flag(o, "keep", 2)
    o.add_argument("--responses", type=int, default=None, metavar="N",
                   help="instruct and dpo: after training, answer the first N test entries into "
                   "instruction-data-with-response.json; 0: none (default: instruct all 110, dpo 0)")
    o.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="instruct and dpo: tokens per response, greedy, stopped at <|endoftext|> "
                   "(default: 256)")


def run(args) -> int:
    if distributed.launched_world_size() > 1:
        raise GPT2Error(f"{PROG} finetune runs on one process; start it without mpiexec")
    args, resume = _resume_settings(args)                                        # 0.
    out = _check(args, resume)                                                   # 1.
    say = _say(not args.no_progress)
    model, tokenizer, reference, source_sha = _load_model(args, resume)          # 2.
    task = _task(args, model, tokenizer, reference, resume)                      # 3.
    optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    if resume is None:
        state, history = TrainState(), History()
    else:
        state, history = _restore(args, resume, model, optimizer, task)
    cfg = TrainConfig(epochs=args.epochs, max_steps=args.max_steps, eval_every=args.eval_every,
                      eval_iter=args.eval_iter, grad_clip=args.grad_clip, sample_prompt=task.sample_prompt,
                      progress=not args.no_progress)
    steps = total_steps(task.train_loader, cfg)
    _print_plan(args, model, task, steps, out, resume, state)
    if args.overwrite:
        clear_out_dir(out, OUTPUTS)

    run_settings = {k: v for k, v in vars(args).items()
                    if k not in ("func", "resume", "overwrite", "out", "given")}
    run_settings |= {"command": "finetune", "source_sha256": source_sha}
    saver = RunSaver(out=out, model=model, optimizer=optimizer,
                     tokenizer=adapt.with_template(tokenizer, task.template),
                     train_loader=task.train_loader, state=state, history=history,
                     comm=distributed.SingleProcess(), run=run_settings, data_sha256=task.data_sha256,
                     keep=args.keep)
    if resume is not None and out.resolve() == run_dir_of(resume.ckpt_dir).resolve():
        saver.saved_step, saver.saved_dir = state.step, resume.ckpt_dir   # that step is saved already

    def save_checkpoints(st) -> None:                                           # 4.
        if st.step % args.save_every == 0:
            saver.save()

    with graceful_stop() as stop:
        stop_asked = lambda st: stop["signal"] is not None   # Ctrl-C or SIGTERM  # noqa: E731
        hooks = (*task.hooks(model, args.eval_iter, say), save_checkpoints, stop_asked)
        try:
            run_training(model, task.train_loader, task.val_loader, optimizer, cfg, tokenizer=tokenizer,
                         state=state, history=history, loss_fn=task.loss_fn, eval_fn=task.eval_fn,
                         hooks=hooks, log=say)
        except NonFiniteError as exc:
            raise nonfinite_error(exc, out, f"finetune {args.task}") from None
        final = saver.save_final()
    print(f"saved checkpoint {final} (step {state.step}; {out / ck.LATEST_FILE} names it)")
    if stop["signal"] is not None:
        print(f"{signal.Signals(stop['signal']).name}: fine-tuning stopped at step {state.step} and saved "
              f"{final}; resume with: {PROG} finetune {args.task} --resume {out}", file=sys.stderr,
              flush=True)
        return 128 + stop["signal"]
    options = ({} if args.task == "classify" else
               dict(responses=args.responses, max_new_tokens=args.max_new_tokens))
    results = task.finish(model, history, out, say=say, progress=not args.no_progress, **options)   # 5.
    safeio.write_json(out / RESULTS_FILE, {"task": args.task, "steps": state.step, **results})
    last = (f"; last evaluation (Step {history.steps[-1]:06d}): train loss {history.train_losses[-1]:.3f}, "
            f"val loss {history.val_losses[-1]:.3f}" if history.steps else "")
    print(f"final: {state.step} steps, {history.seconds:.0f} s{last}; results in {out / RESULTS_FILE}")
    return 0


# ---------------------------------------------------------------------------------------------
# 0-1: settings and checks
# ---------------------------------------------------------------------------------------------

def _parse_for(task: str):
    """The finetune flags of `task` parsed strictly (resumed_args reads the saved settings with it)."""
    parser = StrictParser(add_help=False)
    add_arguments(parser)
    return lambda argv: vars(parser.parse_args([task, *argv]))


def _resume_settings(args):
    """Step 0. With --resume: the run's own settings, with the few this command may change."""
    if args.resume is None:
        if (args.pretrained is None) == (args.checkpoint is None):
            raise GPT2Error("give the model to fine-tune: --pretrained NAME_OR_DIR (OpenAI's GPT-2) or "
                            "--checkpoint DIR (one of ours), or --resume DIR to continue a run")
        return _with_task_defaults(args), None
    if args.pretrained is not None or args.checkpoint is not None:
        raise GPT2Error("--resume continues a run from its own checkpoint; leave out --pretrained and "
                        "--checkpoint (the run knows what it started from)")
    if args.overwrite:
        raise GPT2Error("--resume continues a run in place; it cannot be combined with --overwrite")
    ckpt_dir = ck.resolve_checkpoint(args.resume)
    trainer_state = ck.read_trainer_state(ckpt_dir)
    run = (trainer_state or {}).get("run")
    if isinstance(run, dict) and run.get("command") == "finetune" and run.get("task") != args.task:
        raise GPT2Error(f"{ckpt_dir} is a run of `{PROG} finetune {run.get('task')}`, not {args.task}; "
                        f"resume it with `{PROG} finetune {run.get('task')} --resume {args.resume}`")
    args, changes = resumed_args(args, ckpt_dir, trainer_state, command="finetune",
                                 parse=_parse_for(args.task), may_change=RESUME_MAY_CHANGE)
    if "out" not in (getattr(args, "given", None) or ()):
        args.out = str(run_dir_of(ckpt_dir))     # --out not given: the run's own directory
    return _with_task_defaults(args), Resume(ckpt_dir, trainer_state, changes)


def _with_task_defaults(args):
    """The flags left at None take the book's value for the task."""
    book = BOOK_DEFAULTS[args.task]
    for key in ("epochs", "lr", "weight_decay", "eval_every", "trainable", "beta"):
        if getattr(args, key) is None and key in book:
            setattr(args, key, book[key])
    if args.mask_prompt is None:
        args.mask_prompt = args.task == "dpo"
    if args.responses is None:
        args.responses = book["responses"]   # (instruct: None, every test entry)
    if args.max_new_tokens is None:
        args.max_new_tokens = 256
    if args.out is None:
        args.out = f"runs/{args.task}"
    return args


def _check(args, resume) -> Path:
    """Step 1: every flag, the run directory and the backend, before anything slow happens."""
    given = getattr(args, "given", None) or set()
    for key, tasks in _TASK_ONLY.items():
        if key in given and args.task not in tasks:
            raise GPT2Error(f"{flag_name(key)} applies to {' and '.join(tasks)}, not {args.task}")
    if "trainable" in given and args.lora_rank is not None:
        raise GPT2Error("--trainable does not apply with --lora-rank: LoRA trains its low-rank updates only "
                        "(and a new classifier head); leave one of them out")
    if args.lora_rank is None and ({"lora_alpha", "lora_targets"} & given):
        raise GPT2Error("--lora-alpha and --lora-targets need --lora-rank R")
    for key in ("epochs", "batch_size", "eval_every", "eval_iter", "save_every", "keep", "max_new_tokens"):
        require_positive(flag_name(key), getattr(args, key))
    for key in ("max_steps", "max_length", "lora_rank"):
        require_positive(flag_name(key), getattr(args, key), allow_none=True)
    for key in ("lr", "weight_decay", "grad_clip", "dropout", "beta", "lora_alpha"):
        require_finite(flag_name(key), getattr(args, key))
    check_optimizer_flags(args)
    if not 0.0 <= args.dropout < 1.0:
        raise GPT2Error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.beta is not None and not args.beta > 0:
        raise GPT2Error(f"--beta must be > 0, got {args.beta}")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise GPT2Error(f"--lora-alpha must be > 0, got {args.lora_alpha}")
    if args.seed < 0:
        raise GPT2Error(f"--seed must be an integer >= 0, got {args.seed}")
    if args.responses is not None and args.responses < 0:
        raise GPT2Error(f"--responses must be >= 0 (0: none), got {args.responses}")
    if args.cache_dir is not None and args.pretrained is None:
        raise GPT2Error("--cache-dir only applies to --pretrained")
    if args.data is not None and not Path(args.data).is_file():
        raise GPT2Error(f"--data {args.data} does not exist (or is not a file); give a copy of the "
                        f"{args.task} task's data file, or leave --data out to use the book's")
    out = Path(args.out)
    if resume is None:
        check_out_dir(out, args.overwrite, outputs=OUTPUTS)
    else:
        check_resume_out(out, resume.ckpt_dir, resume.trainer_state.get("step", 0))
    use_backend(args.backend)
    return out


def _say(progress: bool):
    """Print a line: above the progress bar while there is one (tqdm.write), else plainly."""
    if not progress:
        return functools.partial(print, flush=True)
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm.write


# ---------------------------------------------------------------------------------------------
# 2-3: the model and the task
# ---------------------------------------------------------------------------------------------

def _load_source(args):
    """The model --pretrained or --checkpoint names, its LoRA merged, dropout set; its tokenizer."""
    if args.pretrained is not None:
        model = pretrained.load_pretrained(args.pretrained, backend=args.backend, cache_dir=args.cache_dir)
        tokenizer = get_tokenizer()
    else:
        model = ck.load_model(args.checkpoint)
        tokenizer = ck.load_tokenizer(args.checkpoint)
        if not isinstance(tokenizer, Tokenizer) or model.config.vocab_size != tokenizer.vocab_size:
            raise GPT2Error(f"{args.checkpoint} was trained with the {tokenizer.name} tokenizer (vocabulary "
                            f"{tokenizer.vocab_size}); the fine-tuning data are tokenized with GPT-2's "
                            "(50,257 tokens), so fine-tune a model that uses it")
    adapt.merge_lora_into(model)
    adapt.set_dropout(model, args.dropout)
    return model, tokenizer


def _load_model(args, resume):
    """Step 2: the model (the source's, or the checkpoint's to resume), its tokenizer, and for DPO
    the frozen reference and the SHA-256 of its weights (a resumed run rebuilds the reference
    from the source and checks it is the same)."""
    if resume is not None and args.task != "dpo":
        resume.ckpt = ck.load_checkpoint(resume.ckpt_dir)
        return resume.ckpt.model, resume.ckpt.tokenizer or get_tokenizer(), None, None
    source, tokenizer = _load_source(args)
    if args.task != "dpo":
        return source, tokenizer, None, None
    sha = adapt.weights_sha256(source)
    if resume is None:
        return source, tokenizer, adapt.frozen_copy(source), sha
    saved = resume.trainer_state["run"].get("source_sha256")
    if saved != sha:
        where = args.pretrained if args.pretrained is not None else args.checkpoint
        raise GPT2Error(f"the model the run started from, {where}, now holds other weights, so DPO's "
                        "reference (a frozen copy of it) cannot be rebuilt; put those weights back, or start "
                        "a new run")
    source.requires_grad_(False)
    source.eval()
    resume.ckpt = ck.load_checkpoint(resume.ckpt_dir)
    return resume.ckpt.model, resume.ckpt.tokenizer or tokenizer, source, sha


def _task(args, model, tokenizer, reference, resume):
    """Step 3: the task's data (and a new classifier head), LoRA, and what trains."""
    options = dict(path=args.data, batch_size=args.batch_size, seed=args.seed, max_length=args.max_length)
    if args.task != "classify":
        options["mask_prompt"] = args.mask_prompt
    if args.task == "dpo":
        options["beta"] = args.beta
    mg.manual_seed(args.seed)   # a new head (classify) and LoRA's A matrices are drawn from it
    try:
        task = make_task(args.task, model, tokenizer, reference, **options)
    except GPT2Error as exc:
        if args.data is None and "download" in str(exc):
            raise GPT2Error(f"{exc} (--data FILE)") from None
        raise
    if args.lora_rank is not None and resume is None:
        alpha = args.lora_alpha if args.lora_alpha is not None else float(args.lora_rank)
        adapt.add_lora(model, args.lora_rank, alpha, args.lora_targets or "blocks")
    if resume is not None and resume.trainer_state.get("data_sha256") not in (None, task.data_sha256):
        raise GPT2Error(f"{task.data_path} is not the file the run in {resume.ckpt_dir} was trained on (its "
                        "SHA-256 differs); resume with the same data (--data FILE)")
    adapt.freeze(model, _trainable(args))
    return task


def _restore(args, resume, model, optimizer, task):
    """A resumed run: the optimizer's moments, the loader's position, the random generator."""
    ckpt = resume.ckpt
    classifier = ckpt.config.num_classes is not None
    if ckpt.config.lora_rank != args.lora_rank or classifier != (args.task == "classify"):
        raise GPT2Error(f"{resume.ckpt_dir}/config.json does not match the run's settings in "
                        "trainer_state.json (the checkpoint is damaged or was edited)")
    state, history = restore_training(ckpt, optimizer, task.train_loader)
    if any(c.startswith("--lr ") for c in resume.changes):   # a new learning rate from here on
        for g in optimizer.param_groups:
            g["lr"] = args.lr
    return state, history


# ---------------------------------------------------------------------------------------------
# What the run is
# ---------------------------------------------------------------------------------------------

def _trainable(args) -> str:
    """What trains (adapt.freeze): --trainable's choice, or with --lora-rank the LoRA updates."""
    return "lora" if args.lora_rank is not None else args.trainable


def _trains(args, model) -> str:
    if _trainable(args) == "lora":
        c = model.config
        head = ("" if c.num_classes is None or "head" in c.lora_targets else " and the new classifier head")
        return f"LoRA rank {c.lora_rank}, alpha {c.lora_alpha:g} on {', '.join(c.lora_targets)}{head}"
    if _trainable(args) == "last-block":
        return "the last block, the final norm and the head"
    return "every parameter"


def _print_plan(args, model, task, steps, out, resume, state) -> None:
    c = model.config
    source = (f"pretrained {args.pretrained}" if args.pretrained is not None else
              f"checkpoint {args.checkpoint}")
    kind = f"{c.num_classes}-class classifier" if c.num_classes is not None else "language model"
    print(f"model: {source}, {c.n_layers} layers, {c.n_heads} heads, {c.emb_dim} wide, context "
          f"{c.context_length}, {kind}: {model.num_parameters():,} parameters, "
          f"{model.num_parameters(trainable_only=True):,} trainable ({_trains(args, model)})")
    print(f"data: {task.data_path} ({task.about})")
    print(f"fine-tuning ({args.task}): {steps} steps, AdamW lr {args.lr:g} (constant), weight decay "
          f"{args.weight_decay:g}, batch {args.batch_size}, dropout {args.dropout:g}"
          + (f", beta {args.beta:g}" if args.task == "dpo" else "")
          + f", seed {args.seed}, backend {mg.get_backend()}; checkpoints every {args.save_every} steps in "
          f"{out}/ (newest {args.keep} kept)")
    if resume is not None:
        resume.say_where(task.train_loader, state, steps)
    sys.stdout.flush()
