"""`python -m gpt2 bench`: how fast one training step and generation run, and where the time goes.

    python -m gpt2 bench                          # the course run's model and batch, on NumPy
    python -m gpt2 bench --backend cupy --json    # on a GPU, one JSON line
    python -m gpt2 bench --preset shakespeare-char --steps 50 --warmup 10 --no-generate

What is measured, after `warmup` untimed steps, over `steps` timed ones (median, min, max):

* one training step split into its phases: forward (logits and the cross-entropy loss), backward,
  and the AdamW update; their total, and tokens per second;
* peak memory: the process's peak resident set (RSS) on the CPU, CuPy's memory pool on the GPU;
* model FLOPs per step (the matmuls: 6 x tokens x matmul weights, plus attention's score and
  weighted-sum products) and the FLOP/s achieved, as a fraction of the rate a large float32
  matmul reaches on this device *in the same run* (so the fraction says how close the step is
  to the machine's limit, whatever the machine);
* greedy generation of `gen_tokens` tokens from a `prompt_len`-token prompt, batch 1, with and
  without the KV cache, in tokens per second.

The defaults match the PyTorch reference in the repository's `benchmarks/torch_train_step.py`
(GPT-2 124M shape, context 256, dropout 0.1, no qkv bias, untied head, batch 2, AdamW lr 4e-4,
wd 0.1), so the two can be run side by side; `--preset shakespeare-char` times nanoGPT's small
character-level model instead. The Python API is `bench(config, ...) -> dict`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np

import minigrad as mg
from minigrad import backend, optim
from minigrad import functional as F

from ..config import COURSE, MODEL_SIZES, GPTConfig, config_for
from ..errors import GPT2Error
from ..generate import generate
from ..model import GPTModel
from .flags import default_backend

# ---------------------------------------------------------------------------------------------
# what a step costs, on paper
# ---------------------------------------------------------------------------------------------

def matmul_weights(config: GPTConfig) -> int:
    """Weights that take part in a matmul per token: the blocks' four projections and the head
    (embedding lookups, biases and layer norms do no multiply-adds worth counting)."""
    C = config.emb_dim
    return config.n_layers * 12 * C * C + config.vocab_size * C


def step_flops(config: GPTConfig, batch_size: int, context_length: int | None = None) -> int:
    """Model FLOPs of one training step (forward + backward), counting a multiply-add as 2.

    Every weight does one multiply-add per token forward and two backward (input and weight
    gradients): 6 FLOPs per weight per token. Attention's q k^T and P v each cost 2 T^2 C per
    sequence and layer forward (full T x T, as computed), times 3 for forward + backward.
    """
    T = context_length or config.context_length
    tokens = batch_size * T
    attn = 3 * 4 * batch_size * T * T * config.emb_dim * config.n_layers
    return 6 * tokens * matmul_weights(config) + attn


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------

def sync():
    """Wait for the GPU to finish queued work (CuPy launches are asynchronous); no-op on CPU."""
    if backend.get_backend() == "cupy":
        backend.xp.cuda.Device().synchronize()


def _stats(xs) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def matmul_rate(n: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of an (n x n) @ (n x n) float32 matmul on the current backend (best of `repeats`).

    The best, not the median: it estimates what the hardware and BLAS can do, the ceiling the
    training step is compared against.
    """
    xp = backend.xp
    if n is None:
        n = 4096 if backend.get_backend() == "cupy" else 2048
    rng = np.random.default_rng(0)
    a = backend.asarray(rng.standard_normal((n, n), dtype=np.float32))
    b = backend.asarray(rng.standard_normal((n, n), dtype=np.float32))
    c = xp.empty((n, n), dtype=np.float32)
    xp.matmul(a, b, out=c)  # warm-up (threads started, GPU kernels loaded)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        xp.matmul(a, b, out=c)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


class _GpuPeak:
    """Peak bytes held by CuPy's memory pool, sampled after each phase (the pool only grows
    within a step, so sampling at phase ends catches the peak closely)."""

    def __init__(self):
        self.peak = 0

    def sample(self):
        if backend.get_backend() == "cupy":
            self.peak = max(self.peak, backend.xp.get_default_memory_pool().total_bytes())


def bench(config: GPTConfig, batch_size: int = 2, steps: int = 5, warmup: int = 2,
          backend_name: str = "numpy", generation: bool = True, gen_tokens: int = 100,
          prompt_len: int = 10, gen_runs: int = 3, matmul_size: int | None = None, seed: int = 123,
          lr: float = 4e-4, weight_decay: float = 0.1) -> dict:
    """Time training steps (and generation) of `GPTModel(config)`; return the results as a dict.

    Random weights and random token ids (speed does not depend on their values). Runs in float32
    on `backend_name` ("numpy" or "cupy"), which stays selected afterwards.
    """
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise GPT2Error("bench needs steps >= 1, warmup >= 0 and batch_size >= 1")
    mg.set_backend(backend_name)
    mg.set_default_dtype(np.float32)
    mg.manual_seed(seed)
    T = config.context_length

    rate = matmul_rate(matmul_size)
    model = GPTModel(config)
    model.train()
    opt = optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    data = np.random.default_rng(seed).integers(0, config.vocab_size, (batch_size, T + 1))
    x, y = backend.asarray(data[:, :-1]), backend.asarray(data[:, 1:])
    rss_after_init = peak_rss_mib()
    gpu = _GpuPeak()
    gpu.sample()

    phases = {"forward": [], "backward": [], "optimizer": [], "step": []}
    losses = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        sync()
        gpu.sample()
        t1 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        sync()
        gpu.sample()
        t2 = time.perf_counter()
        opt.step()
        sync()
        gpu.sample()
        t3 = time.perf_counter()
        losses.append(loss.item())
        if i >= warmup:
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                phases[k].append(dt)
    train_peak_rss = peak_rss_mib()

    flops = step_flops(config, batch_size)
    step_med = statistics.median(phases["step"])
    tokens = batch_size * T
    result = {
        "bench": "minigrad_gpt2_train_step",
        "backend": backend.get_backend(),
        "cpu_kernels": backend.get_cpu_kernels() if backend.get_backend() == "numpy" else None,
        "device": device_name(),
        "config": config.to_dict(),
        "params": model.num_parameters(),
        "batch_size": batch_size,
        "context_length": T,
        "dtype": "float32",
        "warmup": warmup,
        "steps": steps,
        "time_s": {k: {s: round(v, 4) for s, v in _stats(ts).items()} for k, ts in phases.items()},
        "step_times_s": [round(t, 4) for t in phases["step"]],
        "tokens_per_step": tokens,
        "tokens_per_s": round(tokens / step_med, 2),
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
        "flops_per_step": flops,
        "achieved_flops_per_s": round(flops / step_med, 1),
        "matmul_flops_per_s": round(rate, 1),
        "fraction_of_matmul_rate": round(flops / step_med / rate, 4),
        "peak_rss_mib_after_init": round(rss_after_init, 1),
        "peak_rss_mib": round(train_peak_rss, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
    }
    if backend.get_backend() == "cupy":
        result["peak_gpu_pool_mib"] = round(gpu.peak / 2**20, 1)
    del loss, opt
    if generation:
        result["generate"] = bench_generation(model, gen_tokens, prompt_len, gen_runs, seed)
    return result


def bench_generation(model: GPTModel, new_tokens: int = 100, prompt_len: int = 10, runs: int = 3,
                     seed: int = 0, warmup: int = 1) -> dict:
    """Greedy generation, batch 1, with and without the KV cache: tokens/s (median of `runs`)."""
    prompt = np.random.default_rng(seed).integers(0, model.config.vocab_size, (1, prompt_len))
    res = {"prompt_len": prompt_len, "new_tokens": new_tokens, "runs": runs}
    outputs = {}
    for use_cache in (True, False):
        times = []
        for i in range(warmup + runs):
            sync()
            t0 = time.perf_counter()
            out = generate(model, prompt, new_tokens, temperature=0.0, use_cache=use_cache)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        outputs[use_cache] = out
        med = statistics.median(times)
        res["cache" if use_cache else "no_cache"] = {
            "run_times_s": [round(t, 3) for t in times],
            "tokens_per_s": round(new_tokens / med, 2),
            "tokens_per_s_min": round(new_tokens / max(times), 2),
            "tokens_per_s_max": round(new_tokens / min(times), 2),
        }
    res["same_tokens_cache_vs_no_cache"] = bool(np.array_equal(outputs[True], outputs[False]))
    res["speedup_cache"] = round(res["cache"]["tokens_per_s"] / res["no_cache"]["tokens_per_s"], 2)
    return res


def device_name() -> str:
    """The GPU's name, or the CPU's model name and how many CPUs this machine has."""
    if backend.get_backend() == "cupy":
        cp = backend.xp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} CPUs)"


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------

# Named shapes a user can time with one flag; explicit flags still override them.
PRESETS = {
    # nanoGPT's CPU Shakespeare model (its README's `--device=cpu` run): character level (65
    # symbols), 4 layers, 4 heads, 128 wide, context 64, batch 12, tied head, no dropout.
    "shakespeare-char": dict(vocab_size=65, n_layers=4, n_heads=4, emb_dim=128, context_length=64,
                             batch_size=12, tie_embeddings=True, dropout=0.0),
}


def add_arguments(parser) -> None:
    """Add the bench flags to an argparse (sub)parser. Model flags are those of `train`."""
    parser.add_argument("--model", default="gpt2-124m", choices=list(MODEL_SIZES),
                        help="model size (default gpt2-124m, with the course run's settings: "
                             "context 256, dropout 0.1, no qkv bias, untied head)")
    parser.add_argument("--preset", default=None, choices=list(PRESETS),
                        help="a named shape: shakespeare-char = nanoGPT's CPU Shakespeare model "
                             "(vocab 65, 4 layers, 4 heads, 128 wide, context 64, batch 12, tied "
                             "head, dropout 0); flags given as well override it")
    parser.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary size")
    parser.add_argument("--n-layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--n-heads", type=int, default=None, help="override the number of heads")
    parser.add_argument("--emb-dim", type=int, default=None, help="override the embedding width")
    parser.add_argument("--context-length", type=int, default=None, help="tokens per sequence (256)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (2)")
    parser.add_argument("--dropout", type=float, default=None, help="dropout probability (0.1)")
    parser.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, default=None,
                        help="biases on the query/key/value projection (default: no)")
    parser.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None,
                        help="output head shares the token embedding (default: no)")
    parser.add_argument("--backend", default=default_backend(), choices=["numpy", "cupy"],
                        help="numpy (CPU) or cupy (GPU) (default: $MINIGRAD_BACKEND, else numpy)")
    parser.add_argument("--cpu-kernels", default=None, choices=list(backend.CPU_KERNELS),
                        help="numpy backend: the hot loops as compiled Numba kernels (numba), as "
                             "NumPy twins (numpy), or Numba where installed (auto; the default, "
                             "or MINIGRAD_CPU_KERNELS)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (2)")
    parser.add_argument("--gen-tokens", type=int, default=100, help="tokens to generate (100)")
    parser.add_argument("--no-generate", action="store_true", help="skip the generation benchmark")
    parser.add_argument("--json", action="store_true", help="print one JSON line of results")


def settings_from_args(args) -> dict:
    """Course defaults, then the preset, then every flag the user gave."""
    settings = dict(COURSE, batch_size=2)
    settings.update(PRESETS.get(getattr(args, "preset", None), {}))
    for field in ("vocab_size", "n_layers", "n_heads", "emb_dim", "context_length", "batch_size",
                  "dropout", "qkv_bias", "tie_embeddings"):
        value = getattr(args, field, None)
        if value is not None:
            settings[field] = value
    return settings


def config_from_args(args) -> GPTConfig:
    settings = settings_from_args(args)
    settings.pop("batch_size")
    try:
        return config_for(args.model, **settings)
    except GPT2Error as exc:   # the config's own check, in the words of the flags
        from .train_flags import flag_words  # noqa: PLC0415

        raise GPT2Error(flag_words(str(exc), args.model)) from None


def run(args) -> int:
    """Run the benchmark for parsed `args`; print a table (or one JSON line); return 0."""
    config = config_from_args(args)
    batch_size = settings_from_args(args)["batch_size"]
    if getattr(args, "cpu_kernels", None):
        backend.set_cpu_kernels(args.cpu_kernels)
    res = bench(config, batch_size=batch_size, steps=args.steps, warmup=args.warmup,
                backend_name=args.backend, generation=not args.no_generate, gen_tokens=args.gen_tokens)
    if args.json:
        print(json.dumps(res))
    else:
        print(format_report(res))
    return 0


def format_report(res: dict) -> str:
    c = res["config"]
    t = res["time_s"]
    lines = [
        f"minigrad-gpt2 bench on {res['backend']} ({res['device']})"
        + (f", CPU kernels: {res['cpu_kernels']}" if res.get("cpu_kernels") else ""),
        f"model: {res['params']:,} params ({c['n_layers']} layers, {c['n_heads']} heads, "
        f"{c['emb_dim']} wide, vocab {c['vocab_size']}), batch {res['batch_size']} x context "
        f"{res['context_length']}, float32, {res['steps']} timed steps after {res['warmup']} warm-up",
        "",
        f"{'phase':<12}{'median s':>10}{'min s':>10}{'max s':>10}",
    ]
    for k in ("forward", "backward", "optimizer", "step"):
        lines.append(f"{k:<12}{t[k]['median']:>10.3f}{t[k]['min']:>10.3f}{t[k]['max']:>10.3f}")
    lines += [
        "",
        f"tokens/s            {res['tokens_per_s']:.1f}",
        f"FLOPs per step      {res['flops_per_step'] / 1e9:.1f} GFLOP",
        f"achieved            {res['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = "
        f"{100 * res['fraction_of_matmul_rate']:.0f}% of the float32 matmul rate "
        f"({res['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s)",
        f"peak memory         {res['peak_rss_mib']:.0f} MiB RSS"
        + (f", {res['peak_gpu_pool_mib']:.0f} MiB CuPy pool" if "peak_gpu_pool_mib" in res else ""),
        f"loss                {res['first_loss']:.4f} -> {res['last_loss']:.4f}",
    ]
    g = res.get("generate")
    if g:
        lines += [
            "",
            f"generation ({g['new_tokens']} tokens, greedy, batch 1): "
            f"{g['cache']['tokens_per_s']:.1f} tokens/s with the KV cache, "
            f"{g['no_cache']['tokens_per_s']:.1f} without (x{g['speedup_cache']}); "
            f"same tokens: {g['same_tokens_cache_vs_no_cache']}",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m gpt2.cli.bench", description=__doc__,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
