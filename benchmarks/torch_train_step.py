#!/usr/bin/env python
"""GPT-2 training steps in eager PyTorch on the CPU: the reference `python -m gpt2 bench` is
compared against.

The same model as `gpt2.GPTModel`, written in plain PyTorch with the same parameter names
(`tok_emb`, `blocks.0.attn.qkv`, `blocks.0.mlp.fc`, `ln_f`, `head`, ...), so a
`model.safetensors` saved by minigrad-gpt2 loads into it unchanged (`--init-from`):

    token + position embedding -> dropout -> N pre-LayerNorm blocks -> LayerNorm -> head
    block: x + dropout(proj(attention(ln1(x)))), then x + dropout(proj(gelu(fc(ln2(x)))))

Attention is written out (q k^T / sqrt(D), causal mask, softmax, dropout, weights @ v) as our
engine computes it; GELU is the tanh approximation. A training step is what our bench times:
forward with the mean cross-entropy, zero_grad + backward, torch.optim.AdamW step, float32.

    python benchmarks/torch_train_step.py                       # GPT-2 124M course shape, batch 2 x 256
    python benchmarks/torch_train_step.py --vocab 65 --tie --layers 4 --emb 128 --heads 4 \
        --ctx 64 --batch 12 --dropout 0 --steps 50 --warmup 10      # nanoGPT's Shakespeare model
    python benchmarks/torch_train_step.py --json                # one JSON line

Needs torch (`pip install -e ".[bench-torch]"`); minigrad-gpt2 itself never imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import sys
import time


def build_model(torch, vocab, ctx, emb, heads, layers, dropout, qkv_bias, tie):
    nn, F = torch.nn, torch.nn.functional

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(emb, 3 * emb, bias=qkv_bias)
            self.proj = nn.Linear(emb, emb)
            self.drop = nn.Dropout(dropout)
            mask = torch.triu(torch.ones(ctx, ctx, dtype=torch.bool), diagonal=1)
            self.register_buffer("mask", mask, persistent=False)

        def forward(self, x):
            B, T, C = x.shape
            D = C // heads
            q, k, v = self.qkv(x).view(B, T, 3, heads, D).permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))
            scores = scores.masked_fill(self.mask[:T, :T], float("-inf"))
            y = self.drop(torch.softmax(scores, dim=-1)) @ v
            return self.proj(y.transpose(1, 2).reshape(B, T, C))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(emb, 4 * emb)
            self.proj = nn.Linear(4 * emb, emb)

        def forward(self, x):
            return self.proj(F.gelu(self.fc(x), approximate="tanh"))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = nn.LayerNorm(emb)
            self.attn = Attention()
            self.ln2 = nn.LayerNorm(emb)
            self.mlp = MLP()
            self.drop = nn.Dropout(dropout)

        def forward(self, x):
            x = x + self.drop(self.attn(self.ln1(x)))
            return x + self.drop(self.mlp(self.ln2(x)))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_emb = nn.Embedding(vocab, emb)
            self.pos_emb = nn.Embedding(ctx, emb)
            self.drop = nn.Dropout(dropout)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln_f = nn.LayerNorm(emb)
            self.head = None if tie else nn.Linear(emb, vocab, bias=False)
            # GPT-2's initialisation, as gpt2.GPTModel draws it (different random numbers)
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                elif name.startswith("ln") or ".ln" in name:
                    nn.init.ones_(p)
                else:
                    resid = name.endswith(("attn.proj.weight", "mlp.proj.weight"))
                    nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers) if resid else 0.02)

        def forward(self, ids):
            T = ids.shape[1]
            x = self.drop(self.tok_emb(ids) + self.pos_emb(torch.arange(T)))
            for block in self.blocks:
                x = block(x)
            x = self.ln_f(x)
            return x @ (self.tok_emb.weight if self.head is None else self.head.weight).T

    return GPT()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=50257, help="vocabulary size (50257)")
    p.add_argument("--ctx", type=int, default=256, help="tokens per sequence (256)")
    p.add_argument("--emb", type=int, default=768, help="embedding width (768)")
    p.add_argument("--heads", type=int, default=12, help="attention heads (12)")
    p.add_argument("--layers", type=int, default=12, help="transformer blocks (12)")
    p.add_argument("--batch", type=int, default=2, help="sequences per step (2)")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout probability (0.1)")
    p.add_argument("--qkv-bias", action="store_true", help="biases on the qkv projection (default: none)")
    p.add_argument("--tie", action="store_true", help="output head shares the token embedding")
    p.add_argument("--lr", type=float, default=4e-4, help="AdamW learning rate (4e-4)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (0.1)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (2)")
    p.add_argument("--seed", type=int, default=123, help="seed for weights and data (123)")
    p.add_argument("--init-from", metavar="FILE", default=None,
                   help="start from these weights: a model.safetensors written by minigrad-gpt2")
    p.add_argument("--batches", metavar="FILE", default=None,
                   help="train on these token ids instead of random ones: a .npy int array "
                        "(steps, batch, ctx + 1); inputs are [:, :-1], targets [:, 1:]")
    p.add_argument("--json", action="store_true", help="print one JSON line of results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("error: this reference needs PyTorch: pip install torch (or the bench-torch extra)",
              file=sys.stderr)
        return 2
    import numpy as np

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(torch, args.vocab, args.ctx, args.emb, args.heads, args.layers,
                        args.dropout, args.qkv_bias, args.tie)
    if args.init_from:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(args.init_from), strict=True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if args.batches:
        batches = np.load(args.batches, allow_pickle=False)
        args.warmup, args.steps = 0, len(batches)
    else:
        rng = np.random.default_rng(args.seed)
        data = rng.integers(0, args.vocab, (args.batch, args.ctx + 1))
        batches = [data] * (args.warmup + args.steps)

    phases = {"forward": [], "backward": [], "optimizer": [], "step": []}
    losses = []
    for i, batch in enumerate(batches):
        batch = torch.as_tensor(np.asarray(batch, dtype=np.int64))
        x, y = batch[:, :-1], batch[:, 1:]
        t0 = time.perf_counter()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        losses.append(loss.item())
        if i >= args.warmup:
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                phases[k].append(dt)

    step = statistics.median(phases["step"])
    tokens = len(batches[0]) * (len(batches[0][0]) - 1)
    res = {
        "bench": "torch_train_step",
        "config": {"vocab": args.vocab, "ctx": args.ctx, "emb": args.emb, "heads": args.heads,
                   "layers": args.layers, "batch": args.batch, "dropout": args.dropout,
                   "qkv_bias": args.qkv_bias, "tie": args.tie},
        "params": sum(p.numel() for p in model.parameters()),
        "threads": args.threads, "warmup": args.warmup, "steps": args.steps,
        "time_s": {k: {"median": round(statistics.median(v), 4), "min": round(min(v), 4),
                       "max": round(max(v), 4)} for k, v in phases.items()},
        "step_times_s": [round(t, 4) for t in phases["step"]],
        "tokens_per_s": round(tokens / step, 1),
        "losses": losses if args.batches else None,
        "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    if args.json:
        print(json.dumps(res))
    else:
        t = res["time_s"]
        print(f"PyTorch {res['torch']} eager, {args.threads} threads: {res['params']:,} params, "
              f"batch {args.batch} x {args.ctx}, {args.steps} timed steps after {args.warmup} warm-up")
        for k in phases:
            print(f"{k:<12}{t[k]['median']:>10.4f} s median  (min {t[k]['min']:.4f}, max {t[k]['max']:.4f})")
        print(f"tokens/s    {res['tokens_per_s']:>10.1f}\nloss        {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
