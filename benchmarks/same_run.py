#!/usr/bin/env python
"""Do our engine and PyTorch compute the same training run? The course run's model, from the same
initial weights, on the same batches, with dropout off, trained by both; the losses side by side.

    python benchmarks/same_run.py                    # 30 steps of the course run's model
    python benchmarks/same_run.py --steps 10 --n-layers 2 --emb-dim 128 --n-heads 4   # quicker

1. minigrad-gpt2 builds the course run's model (GPT-2 124M shape, context 256, untied head, no
   qkv bias) with the course's initialisation ("book": PyTorch's layer defaults, seed 123) and
   dropout 0, saves the initial weights (safetensors), and trains `--steps` AdamW steps (lr 4e-4,
   weight decay 0.1 on every parameter, as the course) on The Verdict's training batches,
   recording each step's loss and the batches it used.
2. `torch_train_step.py --init-from <weights> --batches <those batches>` trains the same model
   in PyTorch (our parameter names, so the weights load unchanged) and reports its losses.

Dropout is off because its masks come from each framework's own generator and cannot coincide;
with it on, the two runs are two samples of the same random process, not the same computation.
What remains are float32 rounding differences (other summation orders in BLAS and reductions),
which the steps amplify slowly. Needs torch (`pip install -e ".[bench-torch]"`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="training steps (30)")
    p.add_argument("--n-layers", type=int, default=None, help="override the number of layers (12)")
    p.add_argument("--n-heads", type=int, default=None, help="override the number of heads (12)")
    p.add_argument("--emb-dim", type=int, default=None, help="override the embedding width (768)")
    p.add_argument("--text", default=None, help="training text (default: The Verdict)")
    p.add_argument("--threads", type=int, default=2, help="PyTorch's threads (2)")
    p.add_argument("--python", default=sys.executable,
                   help="the Python that has torch, for the reference (default: this one)")
    p.add_argument("--json", action="store_true", help="print one JSON line of results")
    args = p.parse_args(argv)

    import minigrad as mg
    from gpt2.config import course_config
    from gpt2.data import create_loaders, load_text
    from gpt2.model import GPTModel, init_model_
    from gpt2.train import make_optimizer
    from minigrad import functional as F

    mg.set_default_dtype(np.float32)
    overrides = {k: v for k, v in (("n_layers", args.n_layers), ("n_heads", args.n_heads),
                                   ("emb_dim", args.emb_dim)) if v is not None}
    config = course_config(dropout=0.0, **overrides)
    mg.manual_seed(123)
    model = GPTModel(config)
    init_model_(model, "book")
    train_loader, _ = create_loaders(load_text(args.text), batch_size=2,
                                     max_length=config.context_length, seed=123)
    with tempfile.TemporaryDirectory() as tmp:
        weights, batches_file = Path(tmp) / "model.safetensors", Path(tmp) / "batches.npy"
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(mg.to_numpy(v)) for k, v in model.state_dict().items()},
                  str(weights))
        optimizer = make_optimizer(model, lr=4e-4, weight_decay=0.1)
        ours, batches = [], []
        while len(ours) < args.steps:
            for x, y in train_loader:
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                ours.append(loss.item())
                batches.append(np.concatenate([x, y[:, -1:]], axis=1))   # (B, T + 1)
                if len(ours) == args.steps:
                    break
        np.save(batches_file, np.stack(batches).astype(np.int64), allow_pickle=False)
        cmd = [args.python, str(Path(__file__).with_name("torch_train_step.py")), "--json",
               "--vocab", str(config.vocab_size), "--ctx", str(config.context_length),
               "--emb", str(config.emb_dim), "--heads", str(config.n_heads),
               "--layers", str(config.n_layers), "--batch", "2", "--dropout", "0",
               "--lr", "4e-4", "--weight-decay", "0.1", "--threads", str(args.threads),
               "--init-from", str(weights), "--batches", str(batches_file)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr.strip() or done.stdout.strip(), file=sys.stderr)
            return done.returncode
        theirs = json.loads(done.stdout.strip().splitlines()[-1])["losses"]

    diffs = [abs(a - b) for a, b in zip(ours, theirs)]
    if args.json:
        print(json.dumps({"config": config.to_dict(), "steps": args.steps, "minigrad": ours,
                          "torch": theirs, "max_abs_diff": max(diffs)}))
        return 0
    print(f"{'step':>4} {'minigrad':>10} {'PyTorch':>10} {'|diff|':>10}")
    for i, (a, b, d) in enumerate(zip(ours, theirs, diffs)):
        print(f"{i:>4} {a:>10.4f} {b:>10.4f} {d:>10.2e}")
    print(f"largest difference: {max(diffs):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
