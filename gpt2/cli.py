"""The command line: `python -m gpt2 prepare | train | generate | bench | selftest`.

A thin layer over functions a user could call from Python: it parses flags, checks them, calls
gpt2.data / gpt2.train / gpt2.checkpoint / gpt2.generate, and turns our own errors (GPT2Error,
minigrad's BackendError) into one line on stderr, `error: ...`, with exit code 2.

    python -m gpt2 train --out runs/verdict                       # the course run (chapter 05)
    python -m gpt2 train --resume runs/verdict                    # continue it after Ctrl-C or a crash
    python -m gpt2 generate --checkpoint runs/verdict --prompt "Every effort moves you"
    python -m gpt2 prepare shakespeare --tokenizer char --out data/shakespeare_char
    python -m gpt2 train --data data/shakespeare_char ...                # see README: Shakespeare
    mpiexec -n 2 python -m gpt2 train --batch-size 1               # data parallel: 2 ranks x batch 1
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import math
import signal
import sys
import threading
from pathlib import Path

import numpy as np

import minigrad as mg

from . import ranks, train_flags
from .errors import GPT2Error
from .flags import PROG, one_line, require_finite, require_positive, use_backend
from .run_dir import BEST_DIR, check_out_dir, check_resume_out, clear_out_dir, run_dir_of
from .train_flags import check_args, config_from_args, loop_config_from_args, resumed_args


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
# train
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _graceful_stop():
    """While training: the first Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current
    step and save a checkpoint; a second Ctrl-C stops at once, without saving (the previous
    checkpoint stays the latest). Yields a dict whose "signal" is set when asked to stop."""
    from minigrad.distributed import launched_rank  # noqa: PLC0415

    flag = {"signal": None}

    def handler(signum, frame):
        if flag["signal"] is not None:
            raise KeyboardInterrupt
        flag["signal"] = signum
        if launched_rank() == 0:   # under mpiexec: rank 0 speaks for all (every rank stops together)
            print(f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
                  "(press Ctrl-C again to quit at once without saving)", file=sys.stderr, flush=True)

    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def cmd_train(args) -> int:
    """`train` on one process, or on every rank that `mpiexec -n N` started (data parallel).

    With several ranks only rank 0 prints and writes files. An error in the set-up on any rank
    (bad flags, missing data, flags that differ between ranks) is agreed by all of them and
    printed once by rank 0; an error during training on some ranks only stops every rank."""
    from minigrad import distributed  # noqa: PLC0415

    comm = distributed.init()
    if comm.world_size == 1:
        return _cmd_train(args, comm, {})
    return ranks.run_on_every_rank(comm, args, lambda setup: _cmd_train(args, comm, setup))


def _cmd_train(args, comm, setup: dict) -> int:
    from minigrad import distributed  # noqa: PLC0415

    from . import checkpoint as ck  # noqa: PLC0415
    from . import data  # noqa: PLC0415
    from .model import GPTModel  # noqa: PLC0415
    from .plot import plot_losses  # noqa: PLC0415
    from .tokenizer import get_tokenizer  # noqa: PLC0415
    from .train import (  # noqa: PLC0415
        History,
        NonFiniteError,
        TrainState,
        init_model_,
        make_optimizer,
        total_steps,
    )
    from .train import train as run_training  # noqa: PLC0415

    # 0. Resuming: the run's own settings, with the few this command may change.
    resume, changes = None, []
    if args.resume is not None:
        if args.overwrite:
            raise GPT2Error("--resume continues a run in place; it cannot be combined with --overwrite")
        resume = ck.resolve_checkpoint(args.resume)
        saved_state = ck.read_trainer_state(resume)
        args, changes = resumed_args(args, resume, saved_state)
        given = getattr(args, "given", None)
        if not ("out" in given if given is not None else args.out != "runs/train"):
            args.out = str(run_dir_of(resume))     # --out not given: the run's own directory

    # 1. Check every flag before anything slow happens.
    config = check_args(args, comm.world_size)
    out = Path(args.out)
    if resume is None:
        check_out_dir(out, args.overwrite)
    else:
        check_resume_out(out, resume, saved_state.get("step", 0))
    use_backend(args.backend)
    distributed.select_device(comm)          # with --backend cupy: the GPU of this rank

    # 2. Data. A text file: GPT-2 tokens, windows of context_length in order (stride =
    #    context_length), 90/10 split by characters. A prepared dataset: its tokenizer (the model's
    #    vocabulary follows it), its split, random windows (gpt2/dataset.py).
    data_path = Path(args.data) if args.data is not None else data.verdict_path()
    global_batch = args.batch_size * comm.world_size   # rank r trains on its slice (train.rank_slice)
    if data_path.is_dir():
        from .dataset import PreparedDataset  # noqa: PLC0415

        dataset = PreparedDataset(data_path)
        tokenizer, data_sha256 = dataset.tokenizer, dataset.digest
        config = config_from_args(args, vocab_size=tokenizer.vocab_size)
        train_loader = dataset.loader("train", global_batch, config.context_length, seed=args.seed)
        val_loader = dataset.loader("val", global_batch, config.context_length, seed=args.seed)
        about = (f"{tokenizer.name} tokenizer, vocabulary {tokenizer.vocab_size:,}; train "
                 f"{dataset.num_tokens('train'):,} tokens, val {dataset.num_tokens('val'):,}; random "
                 f"windows, an epoch is {len(train_loader)} batches of "
                 f"{global_batch}x{config.context_length}")
    else:
        dataset = None
        text = data.read_text(data_path)
        data_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        tokenizer = get_tokenizer()
        try:
            train_loader, val_loader = data.create_loaders(text, global_batch, config.context_length,
                                                           seed=args.seed, tokenizer=tokenizer)
        except GPT2Error as exc:
            ranks_note = (f" (with {comm.world_size} ranks the global batch is {comm.world_size} x "
                          f"--batch-size {args.batch_size}: every rank needs its own windows)"
                          if comm.world_size > 1 else "")
            raise GPT2Error(f"{data_path}: {exc}{ranks_note}") from None
        n_tokens = len(train_loader.dataset.ids) + len(val_loader.dataset.ids)
        about = (f"{len(text):,} characters, {n_tokens:,} tokens; train {len(train_loader)} batches of "
                 f"{global_batch}x{config.context_length}, val {len(val_loader)}")
    if args.sample_prompt:
        try:
            tokenizer.encode(args.sample_prompt)
        except GPT2Error as exc:
            raise GPT2Error(f"--sample-prompt: {exc} (or --sample-prompt '' for no samples)") from None

    # 3. Model and optimizer: seeded and new, or exactly as the checkpoint left them.
    if resume is None:
        mg.manual_seed(args.seed)
        model = GPTModel(config)
        init_model_(model, args.init)               # "book" (the course run) or GPT-2's own
        optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay,
                                   decay_all=args.decay_all, betas=(0.9, args.beta2))
        state, history = TrainState(), History()   # filled in as training goes
        ranks.seed_rank_dropout(comm, args.seed)   # same weights on every rank, each its own dropout
    else:
        if saved_state.get("data_sha256") not in (None, data_sha256):
            raise GPT2Error(f"{data_path} is not the text the run in {resume} was trained on (its SHA-256 "
                            "differs); resume with the same data file (--data FILE)")
        ckpt = ck.load_checkpoint(resume)
        if ckpt.config != config:
            raise GPT2Error(f"{resume}/config.json does not match the run's settings in trainer_state.json "
                            "(the checkpoint is damaged or was edited)")
        model = ckpt.model
        optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay,
                                   decay_all=args.decay_all, betas=(0.9, args.beta2))
        saved_loader = (ckpt.trainer_state or {}).get("loader")
        if isinstance(saved_loader, dict) and saved_loader.get("batch_size", train_loader.batch_size) != \
                train_loader.batch_size:   # trained on another number of ranks
            ckpt.trainer_state["loader"] = ranks.rebatched_loader_state(saved_loader, train_loader.batch_size,
                                                                        len(train_loader))
        state, history = ck.restore_training(ckpt, optimizer, train_loader)
        ranks.restore_rank_rng(comm, ckpt.trainer_state, args.seed, state.step)
        if any(c.startswith("--lr ") for c in changes):   # a new (peak) learning rate from here on
            for g in optimizer.param_groups:
                g["lr"] = args.lr
                if "initial_lr" in g:
                    g["initial_lr"] = args.lr
    cfg = loop_config_from_args(args, eval_final=dataset is not None)
    steps = total_steps(train_loader, cfg)
    if comm.world_size > 1:
        ranks.agree_setup(comm, setup, args)     # every rank set up without error, with the same flags
        comm = distributed.for_backend(comm)  # NCCL between GPUs with --backend cupy
        if args.zero:
            from minigrad.zero import ZeroAdamW  # noqa: PLC0415

            optimizer = ZeroAdamW.from_adamw(optimizer, comm)
        if comm.rank:
            cfg = dataclasses.replace(cfg, progress=False, sample_prompt=None)   # rank 0 shows them
    print(f"model: {args.model} shape, {config.n_layers} layers, {config.n_heads} heads, "
          f"{config.emb_dim} wide, context {config.context_length}: {model.num_parameters():,} parameters")
    print(f"data: {data_path} ({about})")
    min_lr = args.min_lr if args.min_lr is not None else args.lr / 10
    schedule = ("constant" if args.warmup_steps is None
                else f"warmup {args.warmup_steps}, cosine to {min_lr:g}")
    print(f"training: {steps} steps"
          + (f" of {args.grad_accum} accumulated batches" if args.grad_accum > 1 else "")
          + f", AdamW lr {args.lr:g} ({schedule}), beta2 {args.beta2:g}, weight decay {args.weight_decay:g}"
          + ("" if args.decay_all else " (matrices only)") + f", {args.init} init, "
          f"seed {args.seed}, backend {mg.get_backend()}; checkpoints every {args.save_every} steps "
          f"in {out}/ (newest {args.keep} kept)")
    if comm.world_size > 1:
        accum = f" x grad-accum {args.grad_accum}" if args.grad_accum > 1 else ""
        print(f"data parallel: {comm.world_size} ranks ({comm.name}) x batch {args.batch_size}{accum} = "
              f"global batch {train_loader.batch_size * args.grad_accum} "
              f"({train_loader.tokens_per_batch * args.grad_accum:,} tokens per step)"
              + (f"; ZeRO-1: AdamW moments {optimizer.state_bytes() / 2**20:,.1f} MiB per rank "
                 f"(unsharded: {2 * 4 * model.num_parameters() / 2**20:,.1f} MiB)" if args.zero else ""))
    if resume is not None:
        if (saved_state.get("world_size") or 1) != comm.world_size:
            print(f"the run was trained on {saved_state.get('world_size') or 1} rank(s) and continues on "
                  f"{comm.world_size}: the global batch is now {train_loader.batch_size}")
        print(f"resuming {resume} at step {state.step} (epoch {train_loader.epoch + 1}, batch "
              f"{train_loader.batch_index + 1} of {len(train_loader)})"
              + (f"; changed: {', '.join(changes)}" if changes else ""))
        if state.step >= steps:
            print(f"the run has already done its {steps} steps; pass a larger --epochs or --max-steps "
                  "to train further")
    sys.stdout.flush()
    if args.overwrite and comm.rank == 0:
        clear_out_dir(out)

    # 4. Train, saving a checkpoint every --save-every steps, at the end and on Ctrl-C.
    run = {k: v for k, v in vars(args).items() if k not in ("func", "resume", "overwrite", "out", "given")}
    saved = {"step": None, "dir": None}
    if resume is not None and out.resolve() == run_dir_of(resume).resolve():
        saved = {"step": state.step, "dir": resume}    # that step is saved already

    def snapshot() -> dict:
        snap = {"step": state.step, "epoch": state.epoch, "tokens_seen": state.tokens_seen,
                "skipped_steps": state.skipped_steps, "loader": train_loader.state_dict(),
                "history": history.to_dict(), "run": run, "data_sha256": data_sha256,
                "best_val_loss": best["val_loss"]}
        if comm.world_size > 1:   # (a collective) every rank's dropout generator, for an exact resume
            snap |= {"world_size": comm.world_size,
                     "rank_rng_states": comm.all_gather_object(mg.get_rng_state())}
        return snap

    def save() -> Path:
        # Every rank takes part (ZeRO's moments and the generators are gathered); rank 0 writes.
        full_optimizer = optimizer.consolidated() if hasattr(optimizer, "consolidated") else optimizer
        snap = snapshot()
        if comm.rank:
            saved["step"], saved["dir"] = state.step, out / ck.checkpoint_name(state.step)
            return saved["dir"]
        try:
            saved["dir"] = ck.save_run_checkpoint(out, model, full_optimizer, snap, step=state.step,
                                                  keep=args.keep, tokenizer=tokenizer)
        except OSError as exc:   # disk full, permissions: the previous checkpoint is untouched
            last = ck.latest_checkpoint(out)
            raise GPT2Error(f"could not save the checkpoint of step {state.step} in {out} ({exc}); "
                            + (f"the previous one, {last}, is intact" if last else "nothing was saved")
                            ) from None
        saved["step"] = state.step
        return saved["dir"]

    # --keep-best: after each evaluation, a lower validation loss than any before replaces out/best
    # (weights, config, tokenizer; no optimizer state). The best so far survives a resume.
    best = {"val_loss": (saved_state or {}).get("best_val_loss") if resume is not None else None,
            "evals": len(history.val_losses)}

    def keep_best() -> None:
        if len(history.val_losses) == best["evals"]:
            return
        best["evals"] = len(history.val_losses)
        v = history.val_losses[-1]
        if math.isfinite(v) and (best["val_loss"] is None or v < best["val_loss"]):
            best["val_loss"] = v
            if comm.rank == 0:   # every rank has the same validation loss; rank 0 writes
                ck.save_run_checkpoint(out, model, None, {"step": state.step, "val_loss": v},
                                       step=state.step, tokenizer=tokenizer, name=BEST_DIR)

    def on_step(st) -> None:
        if args.keep_best:
            keep_best()
        if st.step % args.save_every == 0:
            save()

    first_step = state.step
    with _graceful_stop() as stop:
        try:
            run_training(model, train_loader, val_loader, optimizer, cfg, tokenizer=tokenizer, state=state,
                         history=history, on_step=on_step, comm=comm,
                         stop=lambda: ranks.stop_asked_on_any_rank(comm, stop))
        except NonFiniteError as exc:
            last = ck.latest_checkpoint(out)
            kept = (f"the last good checkpoint, {last}, is kept: resume from it with `{PROG} train --resume "
                    f"{out}` (e.g. with a lower --lr)" if last is not None else
                    "no checkpoint had been saved yet (--save-every N saves one every N steps)")
            err = GPT2Error(f"{exc}; {kept}")
            err.every_rank = True    # the loss and gradient norm are the same on every rank
            raise err from None
        # 5. The final checkpoint (its weights were saved already if the last step was a save step).
        if saved["step"] == state.step:
            if comm.rank == 0:
                ck.update_trainer_state(saved["dir"], {"history": history.to_dict()})
            final = saved["dir"]
        else:
            final = save()
    print(f"saved checkpoint {final} (step {state.step}; {out / ck.LATEST_FILE} names it)")
    if comm.world_size > 1:
        steps_run = max(state.step - first_step, 1)
        print(f"collectives on rank 0: {comm.seconds:.2f} s in {comm.calls} calls, "
              f"{1000 * comm.seconds / steps_run:.1f} ms per step (waiting for the other ranks included)")
    if history.epochs and comm.rank == 0:
        plot = plot_losses(history, out / "loss.png")
        print(f"saved loss plot to {plot}")
        if args.keep_best and best["val_loss"] is not None:
            print(f"best validation loss {best['val_loss']:.4f}: {out / BEST_DIR}")
        print(f"{'so far' if stop['signal'] is not None else 'final'}: train loss "
              f"{history.train_losses[-1]:.3f}, val loss {history.val_losses[-1]:.3f} "
              f"after {state.step} steps, {state.tokens_seen:,} tokens, {history.seconds:.0f} s "
              f"({state.tokens_seen / max(history.seconds, 1e-9):,.0f} tokens/s)")
    if stop["signal"] is not None:
        name = signal.Signals(stop["signal"]).name
        if comm.rank:
            return 128 + stop["signal"]
        print(f"{name}: training stopped at step {state.step} and saved {final}; resume with: "
              f"{PROG} train --resume {out}", file=sys.stderr, flush=True)
        return 128 + stop["signal"]
    return 0


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------

def cmd_generate(args) -> int:
    from .generate import check_sampling_args, generate  # noqa: PLC0415
    from .tokenizer import get_tokenizer  # noqa: PLC0415

    require_positive("--max-new-tokens", args.max_new_tokens)
    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                        names={name: "--" + name.replace("_", "-") for name in
                               ("max_new_tokens", "temperature", "top_k", "top_p")})
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


