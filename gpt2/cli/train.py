"""`python -m gpt2 train`: train a GPT-2 from scratch and save checkpoints to resume from.

One run, in the order the steps happen (`_train`):

  0. resuming: the saved run's own settings, with the few this command may change
  1. every flag checked before anything slow happens (gpt2/cli/train_flags.py, gpt2/cli/run_saver.py)
  2. the data: a text file or a prepared dataset, and the tokenizer that goes with it
  3. the model and optimizer: seeded and new, or exactly as the checkpoint left them
  4. training (gpt2/train.py), with a checkpoint every --save-every steps, at the end and on
     Ctrl-C (RunSaver in gpt2/cli/run_saver.py)
  5. the report: the final checkpoint, the loss plot, the losses

Under `mpiexec -n N` every rank runs these steps; gpt2/cli/ranks.py keeps the ranks in agreement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import minigrad as mg
from minigrad import distributed

from .. import checkpoint as ck
from ..config import GPTConfig, config_for
from ..data import create_loaders, read_text, verdict_path
from ..dataset import PreparedDataset
from ..errors import GPT2Error
from ..model import GPTModel, init_model_
from ..plot import plot_losses
from ..resume import restore_training
from ..tokenizer import get_tokenizer
from ..train import History, NonFiniteError, TrainConfig, TrainState, make_optimizer, total_steps
from ..train import train as run_training
from ..train_extras import schedule_floor
from . import ranks
from .flags import PROG, use_backend
from .run_saver import (
    BEST_DIR,
    RunSaver,
    check_best_dir,
    check_out_dir,
    check_resume_out,
    clear_out_dir,
    run_dir_of,
)
from .train_flags import (
    DEFAULT_SAMPLE_PROMPT,
    Resume,
    check_args,
    config_from_args,
    loop_config_from_args,
    resumed_args,
)


def run(args) -> int:
    """`train` on one process, or on every rank that `mpiexec -n N` started (data parallel).

    With several ranks only rank 0 prints and writes files. An error in the set-up on any rank
    (bad flags, missing data, flags that differ between ranks) is agreed by all of them and
    printed once by rank 0; an error during training on some ranks only stops every rank."""
    comm = distributed.init()
    if comm.world_size == 1:
        return _train(args, comm, {})
    return ranks.run_on_every_rank(comm, args, lambda setup: _train(args, comm, setup))


@dataclass
class _Data:
    """What step 2 loaded: the loaders, their tokenizer, and the model's config to match."""
    path: Path
    tokenizer: object
    sha256: str           # a resumed run must train on the same data
    config: GPTConfig     # the flags' config, with the data's vocabulary
    train_loader: object
    val_loader: object
    prepared: bool        # a prepared dataset (random windows), not a text file
    about: str            # one line for the summary


def _train(args, comm, setup: dict) -> int:
    """The train command on this rank; `setup["agreed"]` turns true once the ranks agreed."""
    args, resume = _resume_settings(args)                                            # 0.
    config, out = _check_before_training(args, comm, resume)                         # 1.
    data = _load_data(args, comm, config)                                            # 2.
    if resume is None:                                                               # 3.
        model, optimizer, state, history = _new_model(args, comm, data.config)
    else:
        model, optimizer, state, history = _resumed_model(args, comm, data, resume)
    cfg = loop_config_from_args(args, eval_final=data.prepared)
    steps = total_steps(data.train_loader, cfg)
    if args.warmup_steps is not None and args.warmup_steps > steps:
        raise GPT2Error(f"--warmup-steps {args.warmup_steps} is more than the run's {steps} steps, so the "
                        f"learning rate would never reach --lr; use at most --warmup-steps {steps} (a tenth "
                        "of the run is usual), or train longer (--max-steps, --epochs)")
    if comm.world_size > 1:
        comm, optimizer, cfg = _join_ranks(args, comm, setup, optimizer, cfg)
    _print_plan(args, comm, data, model, optimizer, steps, out)
    if resume is not None:
        _print_resuming(resume, comm, data.train_loader, state, steps)
    sys.stdout.flush()
    if args.overwrite and comm.rank == 0:
        clear_out_dir(out)

    # 4. Train, saving a checkpoint every --save-every steps, at the end and on Ctrl-C.
    saver = RunSaver(out=out, model=model, optimizer=optimizer, tokenizer=data.tokenizer,
                     train_loader=data.train_loader, state=state, history=history, comm=comm,
                     run={k: v for k, v in vars(args).items()
                          if k not in ("func", "resume", "overwrite", "out", "given")},
                     data_sha256=data.sha256, keep=args.keep,
                     best_val_loss=None if resume is None else resume.trainer_state.get("best_val_loss"))
    if resume is not None and out.resolve() == run_dir_of(resume.ckpt_dir).resolve():
        saver.saved_step, saver.saved_dir = state.step, resume.ckpt_dir   # that step is saved already

    def save_checkpoints(st) -> None:     # after every step: --keep-best, then --save-every
        if args.keep_best:
            saver.keep_best()
        if st.step % args.save_every == 0:
            saver.save()

    first_step = state.step
    with graceful_stop() as stop:
        stop_asked = lambda st: ranks.stop_asked_on_any_rank(comm, stop)   # Ctrl-C/SIGTERM on any rank
        try:
            run_training(model, data.train_loader, data.val_loader, optimizer, cfg, tokenizer=data.tokenizer,
                         state=state, history=history, comm=comm, hooks=(save_checkpoints, stop_asked))
        except NonFiniteError as exc:
            raise nonfinite_error(exc, out) from None
        final = saver.save_final()                                                   # 5.
    _report(saver, final, first_step, stopped=stop["signal"] is not None, keep_best=args.keep_best)
    if stop["signal"] is None:
        return 0
    if comm.rank == 0:
        print(f"{signal.Signals(stop['signal']).name}: training stopped at step {state.step} and saved "
              f"{final}; resume with: {PROG} train --resume {out}", file=sys.stderr, flush=True)
    return 128 + stop["signal"]


def _resume_settings(args):
    """Step 0. With --resume: the run's own settings, with the few this command may change, and
    the run it continues; else the flags as given and None."""
    if args.resume is None:
        return args, None
    if args.overwrite:
        raise GPT2Error("--resume continues a run in place; it cannot be combined with --overwrite")
    ckpt_dir = ck.resolve_checkpoint(args.resume)
    trainer_state = ck.read_trainer_state(ckpt_dir)
    args, changes = resumed_args(args, ckpt_dir, trainer_state)
    given = getattr(args, "given", None)
    if not ("out" in given if given is not None else args.out != "runs/train"):
        args.out = str(run_dir_of(ckpt_dir))     # --out not given: the run's own directory
    return args, Resume(ckpt_dir, trainer_state, changes)


def _check_before_training(args, comm, resume: Resume | None) -> tuple[GPTConfig, Path]:
    """Step 1: every flag, the run directory and the backend, before anything slow happens."""
    config = check_args(args, comm.world_size)
    out = Path(args.out)
    if resume is None:
        check_out_dir(out, args.overwrite, keep_best=args.keep_best)
    else:
        check_resume_out(out, resume.ckpt_dir, resume.trainer_state.get("step", 0))
        if args.keep_best:
            check_best_dir(out)
    use_backend(args.backend)
    distributed.select_device(comm)          # with --backend cupy: the GPU of this rank
    return config, out


def _load_data(args, comm, config: GPTConfig) -> _Data:
    """Step 2. A text file: GPT-2 tokens, windows of context_length in order (stride =
    context_length), 90/10 split by characters. A prepared dataset: its tokenizer (the model's
    vocabulary follows it), its split, random windows (gpt2/dataset.py)."""
    path = Path(args.data) if args.data is not None else verdict_path()
    global_batch = args.batch_size * comm.world_size   # rank r trains on its slice (train_extras.rank_slice)
    if path.is_dir():
        dataset = PreparedDataset(path)
        tokenizer = dataset.tokenizer
        config = config_from_args(args, vocab_size=tokenizer.vocab_size)
        train_loader = dataset.loader("train", global_batch, config.context_length, seed=args.seed)
        val_loader = dataset.loader("val", global_batch, config.context_length, seed=args.seed)
        about = (f"{tokenizer.name} tokenizer, vocabulary {tokenizer.vocab_size:,}; train "
                 f"{dataset.num_tokens('train'):,} tokens, val {dataset.num_tokens('val'):,}; random "
                 f"windows, an epoch is {len(train_loader)} batches of "
                 f"{global_batch}x{config.context_length}")
        data = _Data(path, tokenizer, dataset.digest, config, train_loader, val_loader, True, about)
    else:
        text = read_text(path)
        sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        tokenizer = get_tokenizer()
        try:
            train_loader, val_loader = create_loaders(text, global_batch, config.context_length,
                                                      seed=args.seed, tokenizer=tokenizer)
        except GPT2Error as exc:
            ranks_note = (f" (with {comm.world_size} ranks the global batch is {comm.world_size} x "
                          f"--batch-size {args.batch_size}: every rank needs its own windows)"
                          if comm.world_size > 1 else "")
            raise GPT2Error(f"{path}: {exc}{ranks_note}") from None
        n_train, n_val = len(train_loader.dataset.ids), len(val_loader.dataset.ids)
        # (the halves, split by characters and tokenized apart, may have a token more than the whole)
        about = (f"{len(text):,} characters, {len(tokenizer.encode(text)):,} tokens; split 90/10 by "
                 f"characters: train {n_train:,} tokens in {len(train_loader)} batches of "
                 f"{global_batch}x{config.context_length}, val {n_val:,} tokens in {len(val_loader)}")
        data = _Data(path, tokenizer, sha256, config, train_loader, val_loader, False, about)
    if args.sample_prompt is None:   # the default: the book's prompt, or the data's own first line
        args.sample_prompt = (_first_line(dataset) if data.prepared else DEFAULT_SAMPLE_PROMPT)
    if args.sample_prompt:
        try:
            tokenizer.encode(args.sample_prompt)
        except GPT2Error as exc:
            raise GPT2Error(f"--sample-prompt: {exc} (or --sample-prompt '' for no samples)") from None
    return data


def _first_line(dataset) -> str:
    """The first line of a prepared dataset's text (at most 64 tokens), the default sample prompt:
    "First Citizen:" for Tiny Shakespeare."""
    ids = np.asarray(dataset.shards["train"][0][:64])
    ids = ids[ids < dataset.vocab_size]   # (damaged ids are reported, with the file, by the loader)
    text = dataset.tokenizer.decode(ids)
    line = text.split("\n", 1)[0].strip()
    return (line or text.strip()) or DEFAULT_SAMPLE_PROMPT


def _optimizer(model, args):
    return make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay, decay_all=args.decay_all,
                          betas=(0.9, args.beta2))


def _new_model(args, comm, config: GPTConfig):
    """Step 3 of a new run: seeded weights, a new optimizer, an empty history."""
    mg.manual_seed(args.seed)
    model = GPTModel(config)
    init_model_(model, args.init)               # "book" (the course run) or GPT-2's own
    optimizer = _optimizer(model, args)
    state, history = TrainState(), History()   # filled in as training goes
    ranks.seed_rank_dropout(comm, args.seed)    # same weights on every rank, but each its own dropout masks
    return model, optimizer, state, history


def _resumed_model(args, comm, data: _Data, resume: Resume):
    """Step 3 of a resumed run: the model, optimizer, loader position, history and random
    generators exactly as the checkpoint left them."""
    if resume.trainer_state.get("data_sha256") not in (None, data.sha256):
        raise GPT2Error(f"{data.path} is not the text the run in {resume.ckpt_dir} was trained on (its "
                        "SHA-256 differs); resume with the same data file (--data FILE)")
    ckpt = ck.load_checkpoint(resume.ckpt_dir)
    if ckpt.config != data.config:
        raise GPT2Error(f"{resume.ckpt_dir}/config.json does not match the run's settings in "
                        "trainer_state.json (the checkpoint is damaged or was edited)")
    model = ckpt.model
    optimizer = _optimizer(model, args)
    train_loader = data.train_loader
    saved_loader = (ckpt.trainer_state or {}).get("loader")
    if isinstance(saved_loader, dict) and saved_loader.get("batch_size", train_loader.batch_size) != \
            train_loader.batch_size:   # trained on another number of ranks
        ckpt.trainer_state["loader"] = ranks.rebatched_loader_state(saved_loader, train_loader.batch_size,
                                                                    len(train_loader))
    state, history = restore_training(ckpt, optimizer, train_loader)
    ranks.restore_rank_rng(comm, ckpt.trainer_state, args.seed, state.step)
    if any(c.startswith("--lr ") for c in resume.changes):   # a new (peak) learning rate from here on
        for g in optimizer.param_groups:
            g["lr"] = args.lr
            if "initial_lr" in g:
                g["initial_lr"] = args.lr
    return model, optimizer, state, history


def _join_ranks(args, comm, setup: dict, optimizer, cfg: TrainConfig):
    """With several ranks, once each is set up: agree that all are, with the same flags; then the
    communicator for the backend, ZeRO-1's sharded optimizer, and rank 0 alone showing progress."""
    ranks.agree_setup(comm, setup, args)     # every rank set up without error, with the same flags
    comm = distributed.for_backend(comm)     # NCCL between GPUs with --backend cupy
    if args.zero:
        from minigrad.zero import ZeroAdamW  # noqa: PLC0415

        optimizer = ZeroAdamW.from_adamw(optimizer, comm)
    if comm.rank:
        cfg = dataclasses.replace(cfg, progress=False, sample_prompt=None)   # rank 0 shows them
    return comm, optimizer, cfg


def _print_plan(args, comm, data: _Data, model, optimizer, steps: int, out: Path) -> None:
    config = data.config
    preset = config_for(args.model)
    shape = (f"{args.model} shape" if (config.n_layers, config.n_heads, config.emb_dim) ==
             (preset.n_layers, preset.n_heads, preset.emb_dim) else "custom shape")
    print(f"model: {shape}, {config.n_layers} layers, {config.n_heads} heads, "
          f"{config.emb_dim} wide, context {config.context_length}: {model.num_parameters():,} parameters")
    print(f"data: {data.path} ({data.about})")
    min_lr = schedule_floor(args.lr, args.min_lr)
    schedule = ("constant" if args.warmup_steps is None
                else f"warmup {args.warmup_steps}, cosine to {min_lr:g}")
    print(f"training: {steps} steps"
          + (f" of {args.grad_accum} accumulated batches" if args.grad_accum > 1 else "")
          + f", AdamW lr {args.lr:g} ({schedule}), beta2 {args.beta2:g}, weight decay {args.weight_decay:g}"
          + ("" if args.decay_all else " (matrices only)") + f", {args.init} init, "
          f"seed {args.seed}, backend {mg.get_backend()}"
          + (f" ({mg.backend.get_cpu_kernels()} CPU kernels)" if mg.get_backend() == "numpy" else "")
          + f"; checkpoints every {args.save_every} steps "
          f"in {out}/ (newest {args.keep} kept)")
    if comm.world_size > 1:
        loader = data.train_loader
        accum = f" x grad-accum {args.grad_accum}" if args.grad_accum > 1 else ""
        print(f"data parallel: {comm.world_size} ranks ({comm.name}) x batch {args.batch_size}{accum} = "
              f"global batch {loader.batch_size * args.grad_accum} "
              f"({loader.tokens_per_batch * args.grad_accum:,} tokens per step)"
              + (f"; ZeRO-1: AdamW moments {optimizer.state_bytes() / 2**20:,.1f} MiB per rank "
                 f"(unsharded: {2 * 4 * model.num_parameters() / 2**20:,.1f} MiB)" if args.zero else ""))


def _print_resuming(resume: Resume, comm, train_loader, state, steps: int) -> None:
    saved_world_size = resume.trainer_state.get("world_size") or 1
    if saved_world_size != comm.world_size:
        print(f"the run was trained on {saved_world_size} rank(s) and continues on "
              f"{comm.world_size}: the global batch is now {train_loader.batch_size}")
    resume.say_where(train_loader, state, steps)


@contextlib.contextmanager
def graceful_stop():
    """While training: the first Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current
    step and save a checkpoint; a second Ctrl-C stops at once, without saving (the previous
    checkpoint stays the latest). Yields a dict whose "signal" is set when asked to stop."""
    flag = {"signal": None}

    def handler(signum, frame):
        if flag["signal"] is not None:
            raise KeyboardInterrupt
        flag["signal"] = signum
        if distributed.launched_rank() == 0:   # under mpiexec: rank 0 speaks for all (all stop together)
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


def nonfinite_error(exc: NonFiniteError, out: Path, command: str = "train") -> GPT2Error:
    """A NaN/inf loss or gradient: the error every rank raises, naming the checkpoint to go back to
    (`command`: the command that resumes it, e.g. "finetune classify")."""
    last = ck.latest_checkpoint(out)
    kept = (f"the last good checkpoint, {last}, is kept: resume from it with `{PROG} {command} --resume "
            f"{out}` (e.g. with a lower --lr)" if last is not None else
            "no checkpoint had been saved yet (--save-every N saves one every N steps)")
    err = GPT2Error(f"{exc}; {kept}")
    err.every_rank = True    # the loss and gradient norm are the same on every rank
    return err


def _report(saver: RunSaver, final: Path, first_step: int, stopped: bool, keep_best: bool) -> None:
    """Step 5: where the final checkpoint is, and (rank 0) the loss plot and the last losses."""
    comm, state, history, out = saver.comm, saver.state, saver.history, saver.out
    print(f"saved checkpoint {final} (step {state.step}; {out / ck.LATEST_FILE} names it)")
    if comm.world_size > 1:
        steps_run = max(state.step - first_step, 1)
        print(f"collectives on rank 0: {comm.seconds:.2f} s in {comm.calls} calls, "
              f"{1000 * comm.seconds / steps_run:.1f} ms per step (waiting for the other ranks included)")
    if history.epochs and comm.rank == 0:
        plot = plot_losses(history, out / "loss.png")
        print(f"saved loss plot to {plot}")
        if keep_best and saver.best_val_loss is not None:
            print(f"best validation loss {saver.best_val_loss:.4f}: {out / BEST_DIR}")
        # The last evaluation need not be after the last step (every --eval-every steps): say which.
        print(f"{'so far' if stopped else 'final'}: {state.step} steps, {state.tokens_seen:,} tokens, "
              f"{history.seconds:.0f} s ({state.tokens_seen / max(history.seconds, 1e-9):,.0f} tokens/s); "
              f"last evaluation (Step {history.steps[-1]:06d}): train loss {history.train_losses[-1]:.3f}, "
              f"val loss {history.val_losses[-1]:.3f}")
