#!/usr/bin/env python
"""The operations of one training step, timed one by one in minigrad (NumPy) and PyTorch, side by
side: where a whole-step difference between the two engines comes from.

For each operation, the same shapes and float32 data on both sides, the median of `--repeats`
calls after a few untimed ones, in microseconds:

* the matmuls of every `linear` of the model (forward x W^T, and backward's g W and g^T x),
  by the BLAS each library calls (NumPy's OpenBLAS; PyTorch's own, usually MKL on x86);
* the elementwise and row-wise work: GELU forward and backward, layer norm forward and backward,
  attention forward and backward (scores, masked softmax, weighted sum), as minigrad's fused ops
  and as PyTorch's;
* the whole step's bookkeeping: a model of the same depth but 8 wide, where every array is tiny,
  so what is left is each engine's per-op overhead (graph, autograd, optimizer loop).

Where minigrad has two CPU versions of an op (the compiled Numba loops of `minigrad.cpu_kernels`
and their NumPy twins in `minigrad.kernels`), both are timed: "ours" is the one in use (Numba
where installed, see `backend.set_cpu_kernels`), "twin" the NumPy one (`--no-twin` skips it).

Shapes default to nanoGPT's CPU Shakespeare model (`--preset shakespeare-char` of `python -m gpt2
bench`): batch 12, context 64, 128 wide, 4 heads, 4 layers, vocabulary 65; the flags change them.

    python benchmarks/ops_side_by_side.py
    python benchmarks/ops_side_by_side.py --batch 2 --ctx 256 --emb 768 --heads 12 --json

Needs torch (`pip install -e ".[bench-torch]"`); minigrad-gpt2 never imports it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=12, help="sequences (12)")
    p.add_argument("--ctx", type=int, default=64, help="tokens per sequence (64)")
    p.add_argument("--emb", type=int, default=128, help="embedding width (128)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (4)")
    p.add_argument("--layers", type=int, default=4, help="layers, for the bookkeeping step (4)")
    p.add_argument("--vocab", type=int, default=65, help="vocabulary, for the head's matmul (65)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    p.add_argument("--repeats", type=int, default=100, help="timed calls per operation (100)")
    p.add_argument("--no-twin", action="store_true", help="do not time the NumPy twins as well")
    p.add_argument("--cpu-time", action="store_true",
                   help="time each call by the process's CPU time instead of the wall clock: with "
                        "one thread (--threads 1, OPENBLAS_NUM_THREADS=1, MINIGRAD_NUM_THREADS=1) "
                        "the work itself, unmoved by other jobs taking turns on the cores")
    p.add_argument("--json", action="store_true", help="print one JSON line of results")
    return p.parse_args(argv)


CLOCK = time.perf_counter  # time.process_time with --cpu-time


def median_us(fn, repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return round(statistics.median(times) * 1e6, 1)


def main(argv=None) -> int:
    global CLOCK
    args = parse_args(argv)
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    try:
        import torch
        import torch.nn.functional as TF
    except ImportError:
        print("error: this reference needs PyTorch: pip install torch (or the bench-torch extra)",
              file=sys.stderr)
        return 2
    import minigrad as mg
    from gpt2.config import GPTConfig
    from gpt2.model import GPTModel
    from minigrad import backend, kernels, optim
    from minigrad import functional as F

    mg.backend.tune_malloc()  # as `python -m gpt2 bench` runs: freed memory kept for reuse
    torch.set_num_threads(args.threads)
    B, T, C, H, V, R = args.batch, args.ctx, args.emb, args.heads, args.vocab, args.repeats
    N, D = B * T, C // H
    rng = np.random.default_rng(0)

    def arr(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    rows = []
    kernels_in_use = backend.get_cpu_kernels()
    time_twins = kernels_in_use != "numpy" and not args.no_twin

    def row(name, ours, theirs, twin=None):
        rows.append({"op": name, "ours_us": ours, "torch_us": theirs, "ratio": round(ours / theirs, 2),
                     "twin_us": twin})

    def ours_and_twin(fn):
        """(median of fn with the kernels in use, median with the NumPy twins or None)."""
        ours = median_us(fn, R)
        if not time_twins:
            return ours, None
        with backend.cpu_kernels("numpy"):
            return ours, median_us(fn, R)

    # --- the linears' matmuls -------------------------------------------------------------------
    def linear_matmuls(fan_in, fan_out, what):
        x, W, g = arr(N, fan_in), arr(fan_out, fan_in), arr(N, fan_out)
        tx, tW, tg = (torch.from_numpy(a.copy()) for a in (x, W, g))
        row(f"{what} ({N}x{fan_in} -> {fan_out}): x W^T", median_us(lambda: x @ W.T, R),
            median_us(lambda: tx @ tW.T, R))
        row(f"{what}: g W", median_us(lambda: g @ W, R), median_us(lambda: tg @ tW, R))
        row(f"{what}: g^T x", median_us(lambda: g.T @ x, R), median_us(lambda: tg.T @ tx, R))

    for fan_in, fan_out, what in [(C, 3 * C, "qkv"), (C, C, "attn proj"), (C, 4 * C, "mlp fc"),
                                  (4 * C, C, "mlp proj"), (C, V, "head")]:
        linear_matmuls(fan_in, fan_out, what)

    # --- elementwise and row-wise ops, forward + backward as each engine runs them ---------------
    def fwd_bwd(op, inputs, g, no_grad):
        """Timed closures for either engine: `op` forward only, and forward + backward of g."""
        def forward():
            with no_grad():
                op(*inputs)

        def forward_backward():
            op(*inputs).backward(g)
        return forward, forward_backward

    targets = rng.integers(0, V, N)
    ttargets = torch.from_numpy(targets)
    ln_w, ln_b = mg.Tensor(np.ones(C, np.float32)), mg.Tensor(np.zeros(C, np.float32))
    tln_w, tln_b = torch.ones(C), torch.zeros(C)
    ops = {
        f"GELU ({B}x{T}x{4 * C})": (lambda x: F.gelu(x), lambda x: TF.gelu(x, approximate="tanh"),
                                    [(B, T, 4 * C)]),
        f"layer norm ({B}x{T}x{C})": (lambda x: F.layer_norm(x, ln_w, ln_b),
                                      lambda x: TF.layer_norm(x, (C,), tln_w, tln_b), [(B, T, C)]),
        f"causal attention ({B}x{H}x{T}x{D})": (
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True),
            lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=True),
            [(B, H, T, D)] * 3),
        f"cross-entropy ({N}x{V})": (lambda z: F.cross_entropy(z, targets),
                                     lambda z: TF.cross_entropy(z, ttargets), [(N, V)]),
    }
    for name, (ours_op, torch_op, shapes) in ops.items():
        ins = [mg.Tensor(arr(*s), requires_grad=True) for s in shapes]
        of, ofb = fwd_bwd(ours_op, ins, arr(*ours_op(*ins).shape), mg.no_grad)
        tins = [torch.from_numpy(arr(*s)).requires_grad_() for s in shapes]
        tf, tfb = fwd_bwd(torch_op, tins, torch.from_numpy(arr(*torch_op(*tins).shape)), torch.no_grad)
        ours, twin = ours_and_twin(of)
        row(f"{name}: forward", ours, median_us(tf, R), twin)
        ours, twin = ours_and_twin(ofb)
        row(f"{name}: forward + backward", ours, median_us(tfb, R), twin)

    # AdamW over the model's parameters, one update
    config = GPTConfig(vocab_size=V, context_length=T, emb_dim=C, n_heads=H, n_layers=args.layers,
                       dropout=0.0, qkv_bias=False, tie_embeddings=True)
    model = GPTModel(config)
    for p in model.parameters():
        p.grad = arr(*p.shape) * np.float32(1e-3)
    opt = optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    tparams = [torch.from_numpy(p.data.copy()).requires_grad_() for p in model.parameters()]
    for tp, p in zip(tparams, model.parameters()):
        tp.grad = torch.from_numpy(p.grad.copy())
    topt = torch.optim.AdamW(tparams, lr=1e-3, weight_decay=0.1)
    n_params = sum(p.size for p in model.parameters())
    ours, twin = ours_and_twin(opt.step)
    row(f"AdamW update ({n_params:,} parameters)", ours, median_us(topt.step, R), twin)

    # --- bookkeeping: the same depth, 8 wide, context 4, batch 1 ---------------------------------
    tiny = GPTConfig(vocab_size=V, context_length=4, emb_dim=8, n_heads=H if 8 % H == 0 else 1,
                     n_layers=args.layers, dropout=0.0, qkv_bias=False, tie_embeddings=True)
    tiny_model = GPTModel(tiny)
    tiny_opt = optim.AdamW(tiny_model.parameters(), lr=1e-3, weight_decay=0.1)
    ids = rng.integers(0, V, (1, 4))

    def ours_tiny_step():
        loss = F.cross_entropy(tiny_model(ids), ids)
        tiny_opt.zero_grad()
        loss.backward()
        tiny_opt.step()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from torch_train_step import build_model  # the reference model of torch_train_step.py

    torch_tiny = build_model(torch, vocab=V, ctx=4, emb=8, heads=tiny.n_heads, layers=args.layers,
                             dropout=0.0, qkv_bias=False, tie=True)
    torch_tiny_opt = torch.optim.AdamW(torch_tiny.parameters(), lr=1e-3, weight_decay=0.1)
    tids = torch.from_numpy(ids)

    def torch_tiny_step():
        logits = torch_tiny(tids)
        loss = TF.cross_entropy(logits.reshape(-1, V), tids.reshape(-1))
        torch_tiny_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch_tiny_opt.step()

    ours, twin = ours_and_twin(ours_tiny_step)
    row(f"a whole step, {args.layers} layers 8 wide (bookkeeping only)", ours,
        median_us(torch_tiny_step, R), twin)

    result = {"bench": "ops_side_by_side", "shape": {"batch": B, "ctx": T, "emb": C, "heads": H,
              "layers": args.layers, "vocab": V}, "threads": args.threads, "repeats": R,
              "clock": "cpu" if args.cpu_time else "wall", "ops": rows, "cpu_kernels": kernels_in_use,
              "numpy": np.__version__, "torch": torch.__version__,
              "elementwise_chunk": kernels.ELEMENTWISE_CHUNK}
    if args.json:
        print(json.dumps(result))
        return 0
    width = max(len(r["op"]) for r in rows)
    print(f"minigrad's CPU kernels: {kernels_in_use}" + ("; twin = the NumPy twins" if time_twins else ""))
    print(f"{'operation':{width}}  {'ours µs':>9}  {'torch µs':>9}  ratio  {'twin µs':>9}")
    for r in rows:
        twin = f"{r['twin_us']:9.1f}" if r["twin_us"] is not None else f"{'':9}"
        print(f"{r['op']:{width}}  {r['ours_us']:9.1f}  {r['torch_us']:9.1f}  {r['ratio']:5.2f}  {twin}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
