#!/usr/bin/env python
"""nanoGPT's CPU Shakespeare run in eager PyTorch: the wall-time reference for README's
`python -m gpt2 train --data data/shakespeare_char ...` run.

The same run as nanoGPT's `train.py config/train_shakespeare_char.py --device=cpu --compile=False
--eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
--n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`, written out here so that it
needs nothing but PyTorch, on the same token ids our run reads:

    model       4 layers, 4 heads, 128 wide, context 64, tied head, biases on, dropout 0
                (torch_train_step.build_model: the same parameter names as gpt2.GPTModel)
    data        the prepared dataset's train and val shards (`python -m gpt2 prepare
                shakespeare --tokenizer char --out data/shakespeare_char`), random windows
    optimizer   AdamW lr 1e-3, betas (0.9, 0.99), weight decay 0.1 on matrices only
    schedule    100 warmup steps, cosine to 1e-4 at the last step; gradient norm clipped to 1
    evaluation  every 250 steps and after the last one: the mean loss of 20 random batches of
                each split, under torch.no_grad, in eval mode

    python benchmarks/torch_shakespeare_run.py --data data/shakespeare_char
    python benchmarks/torch_shakespeare_run.py --data data/shakespeare_char --json

The windows are drawn with NumPy's generator, seeded, not with our loader's stream: the two runs
see different batches and different initial weights, so their losses agree statistically, not
digit for digit. The time printed is the whole run's (start to last evaluation), and the
process's own wall time is what `farm-bench`-style side-by-side timing measures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_train_step import build_model  # noqa: E402


def read_split(folder: Path, split: str):
    """The concatenated token ids of one split of a prepared dataset (manifest.json + shards)."""
    import numpy as np

    manifest = json.loads((folder / "manifest.json").read_text())
    dtype = np.dtype(manifest["dtype"])
    parts = [np.fromfile(folder / s["file"], dtype=dtype) for s in manifest["splits"][split]["shards"]]
    return np.concatenate(parts).astype(np.int64), manifest


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warmup, then cosine from lr to min_lr, reaching min_lr at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a prepared char-level dataset folder")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--json", action="store_true", help="print one JSON line at the end")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("error: this reference needs PyTorch: pip install torch (or the bench-torch extra)",
              file=sys.stderr)
        return 2
    import numpy as np

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.data)
    train_ids, manifest = read_split(folder, "train")
    val_ids, _ = read_split(folder, "val")
    vocab = int(manifest["vocab_size"])
    batch, ctx = 12, 64
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = build_model(torch, vocab, ctx, 128, 4, 4, 0.0, True, True)
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))

    def get_batch(ids):
        starts = rng.integers(0, len(ids) - ctx - 1, batch)
        windows = np.stack([ids[s:s + ctx + 1] for s in starts])
        w = torch.as_tensor(windows)
        return w[:, :-1], w[:, 1:]

    def loss_of(x, y):
        logits = model(x)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    @torch.no_grad()
    def evaluate():
        model.eval()
        out = [float(np.mean([loss_of(*get_batch(ids)).item() for _ in range(args.eval_iters)]))
               for ids in (train_ids, val_ids)]
        model.train()
        return out

    history = []
    step_times = []
    model.train()
    for step in range(args.steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, 1e-3, 1e-4, 100, args.steps)
        x, y = get_batch(train_ids)
        loss = loss_of(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step_times.append(time.perf_counter() - t0)
        if step % args.eval_every == 0 or step == args.steps - 1:
            train_loss, val_loss = evaluate()
            history.append((step, train_loss, val_loss))
            if not args.json:
                print(f"step {step:5d}: train loss {train_loss:.3f}, val loss {val_loss:.3f}, "
                      f"{1000 * float(np.median(step_times[-50:])):.1f} ms/step", flush=True)
    seconds = time.perf_counter() - t_start
    result = {"bench": "torch_shakespeare_run", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "steps": args.steps,
              "final_train_loss": round(history[-1][1], 4), "final_val_loss": round(history[-1][2], 4),
              "median_step_ms": round(1000 * float(np.median(step_times)), 2),
              "seconds": round(seconds, 1)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"PyTorch {torch.__version__} eager, {result['threads']} threads: final train "
              f"{result['final_train_loss']:.3f}, val {result['final_val_loss']:.3f}; "
              f"{result['seconds']:.1f} s in all, {result['median_step_ms']:.1f} ms/step (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
