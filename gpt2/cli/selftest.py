"""`python -m gpt2 selftest --backend cupy`: the acceptance run for a machine with a GPU.

One command that answers "does this project work on this GPU?", with a short report:

    device, CUDA runtime/driver, CuPy and NumPy versions
    kernels      every fused kernel against its NumPy twin, float32 and float64
    gradients    float64 finite-difference checks of the fused ops and a whole small GPT
    training     a short run of the course model (124M shape, The Verdict): the loss must fall
    generation   greedy decoding with and without the KV cache: the same tokens; tokens/s
    bench        training-step time and tokens/s (`python -m gpt2 bench` on this backend)
    test suite   pytest's CuPy half (`-k cupy`), when run from a checkout that has tests/

It exits 0 when every check passes and 1 otherwise. `--quick` swaps the 124M course model for
a tiny one and random tokens and leaves pytest out (seconds instead of minutes; no download),
which is how the test suite runs this command on the CPU stand-in for CuPy. Without --backend
it checks the GPU when one can be used, else the CPU.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

import minigrad as mg
from minigrad import Tensor, kernels
from minigrad import functional as F

from ..config import GPTConfig, course_config
from ..model import GPTModel
from . import bench
from .flags import default_backend

TINY = GPTConfig(vocab_size=101, context_length=32, emb_dim=32, n_heads=4, n_layers=2, dropout=0.0,
                 qkv_bias=False, tie_embeddings=False)
# ---------------------------------------------------------------------------------------------
# what machine is this
# ---------------------------------------------------------------------------------------------

def environment() -> dict:
    info = {"backend": mg.get_backend(), "numpy": np.__version__, "python": platform.python_version(),
            "device": bench.device_name()}   # the GPU's name, or the CPU's model name
    if mg.get_backend() == "cupy":
        cp = mg.backend.xp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        info["compute_capability"] = f"{props.get('major', '?')}.{props.get('minor', '?')}"
        info["cupy"] = getattr(cp, "__version__", "?")
        info["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
        info["cuda_driver"] = cp.cuda.runtime.driverGetVersion()
    return info


# ---------------------------------------------------------------------------------------------
# the checks: each returns a dict of figures, or raises AssertionError with what was wrong
# ---------------------------------------------------------------------------------------------

def check_kernels() -> dict:
    """Each fused kernel on this backend against its NumPy twin (the twins are the reference
    the CPU path is tested with), in float32 and float64."""
    on = mg.get_backend()
    worst = {}
    rng = np.random.default_rng(0)
    for dtype, rtol in ((np.float32, 1e-4), (np.float64, 1e-10)):
        x = (2 * rng.standard_normal((4, 6, 16))).astype(dtype)
        g = rng.standard_normal((4, 6, 16)).astype(dtype)
        w, b = (1 + rng.standard_normal(16)).astype(dtype), rng.standard_normal(16).astype(dtype)
        mean = x.mean(-1, keepdims=True)
        rstd = 1 / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
        z = x.reshape(-1, 16)
        t = np.arange(z.shape[0]) % 16
        valid = np.ones(z.shape[0], dtype=bool)
        scale = np.full(z.shape[0], 0.5, dtype=dtype)
        cases = {
            "gelu_forward": (kernels.gelu_forward, (x,)),
            "gelu_backward": (kernels.gelu_backward, (x, g)),
            "softmax": (kernels.softmax, (x,)),
            "layer_norm_forward": (lambda *a: kernels.layer_norm_forward(*a, 1e-5), (x, w, b)),
            "layer_norm_backward": (kernels.layer_norm_backward, (x, mean, rstd, w, g)),
            "softmax_cross_entropy": (kernels.softmax_cross_entropy, (z, t, valid)),
            "cross_entropy_grad": (kernels.cross_entropy_grad_, (np.abs(z) / 100, t, scale)),
            "adamw": (_adamw_twice, (x, g)),
        }
        for name, (fn, args) in cases.items():
            mine = _flatten(fn(*[mg.backend.asarray(a.copy()) for a in args]))  # some work in place
            mg.set_backend("numpy")
            try:
                ref = _flatten(fn(*[a.copy() for a in args]))
            finally:
                mg.set_backend(on)
            err = 0.0
            for a, r in zip(mine, ref):
                a = mg.to_numpy(a)
                if a.dtype != r.dtype:
                    raise AssertionError(f"{name} ({np.dtype(dtype).name}): dtype {a.dtype}, "
                                         f"NumPy twin {r.dtype}")
                scale_ = np.abs(r).max() + 1e-30
                err = max(err, float(np.abs(a - r).max() / scale_))
            if not err <= rtol:
                raise AssertionError(f"{name} ({np.dtype(dtype).name}): relative error {err:.2e} "
                                     f"> {rtol:.0e}")
            worst[f"{name}/{np.dtype(dtype).name}"] = err
    return {"kernels_checked": len(worst), "worst_relative_error": float(f"{max(worst.values()):.2e}")}


def _adamw_twice(x, g):
    xp = mg.backend.xp
    w, m, v = x.copy(), xp.zeros_like(x), xp.zeros_like(x)
    for step in (1, 2):
        kernels.adamw_update_(w, g, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.1, step)
    return w, m, v


def _flatten(out):
    return [a for a in (out if isinstance(out, tuple) else (out,)) if a is not None]


def check_gradients() -> dict:
    """float64 central differences against backward, on this backend."""
    dtype = mg.get_default_dtype()
    mg.set_default_dtype(np.float64)
    try:
        rng = np.random.default_rng(1)

        def t(*shape):
            return Tensor(rng.standard_normal(shape), requires_grad=True)
        checks = {
            "gelu": (F.gelu, (t(3, 8),)),
            "layer_norm": (lambda a, w, b: F.layer_norm(a, w, b), (t(3, 8), t(8), t(8))),
            "softmax": (F.softmax, (t(3, 8),)),
            "cross_entropy": (lambda z: F.cross_entropy(z, np.array([1, 2, 0])), (t(3, 5),)),
            "attention": (F.scaled_dot_product_attention, (t(1, 2, 4, 3), t(1, 2, 4, 3), t(1, 2, 4, 3))),
        }
        for name, (fn, args) in checks.items():
            if not mg.gradcheck(fn, *args, atol=1e-7, rtol=1e-5):
                raise AssertionError(f"gradcheck failed for {name}")
        mg.manual_seed(0)
        model = GPTModel(GPTConfig(vocab_size=7, context_length=3, emb_dim=4, n_heads=2, n_layers=1,
                                   dropout=0.0)).eval()
        ids, targets = rng.integers(0, 7, (2, 3)), rng.integers(0, 7, (2, 3))
        if not mg.gradcheck(lambda *ps: F.cross_entropy(model(ids), targets), *model.parameters(),
                            atol=1e-7, rtol=1e-5):
            raise AssertionError("gradcheck failed for the whole model")
    finally:
        mg.set_default_dtype(dtype)
    return {"ops_checked": len(checks) + 1}


def _model_and_batches(quick: bool, steps: int, batch_size: int):
    """The model to train and `steps` (input, target) batches: the course shape on The Verdict,
    or (quick) a tiny model on one fixed batch of random tokens, which it must memorise."""
    if quick:
        config = TINY
        rng = np.random.default_rng(0)
        x = rng.integers(0, config.vocab_size, (batch_size, config.context_length + 1))
        batches = [(x[:, :-1], x[:, 1:])] * steps
    else:
        from ..data import create_loaders, load_text  # noqa: PLC0415
        from ..tokenizer import get_tokenizer  # noqa: PLC0415

        config = course_config()
        loader, _ = create_loaders(load_text(), batch_size=batch_size, max_length=config.context_length,
                                   seed=123, tokenizer=get_tokenizer())
        batches = [b for _, b in zip(range(steps), loader)]
    mg.manual_seed(123)
    return GPTModel(config), batches


def check_training(quick: bool, steps: int | None = None, batch_size: int = 2) -> tuple[dict, GPTModel]:
    """A short training run (AdamW, lr 4e-4 as in the course; quick: 1e-2): the loss must fall."""
    steps = steps or (30 if quick else 20)
    model, batches = _model_and_batches(quick, steps, batch_size)
    opt = mg.optim.AdamW(model.parameters(), lr=1e-2 if quick else 4e-4, weight_decay=0.1)
    losses, times = [], []
    for x, y in batches:
        bench.sync()
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bench.sync()
        times.append(time.perf_counter() - t0)
    if not all(np.isfinite(losses)):
        raise AssertionError(f"non-finite loss: {losses}")
    first, last = losses[0], min(losses[-3:])
    if not last < first - (2.0 if quick else 1.0):
        raise AssertionError(f"the loss did not fall enough: {first:.3f} -> {last:.3f} in {steps} steps")
    tokens = batches[0][0].size
    med = statistics.median(times[1:])
    return {"steps": steps, "first_loss": round(first, 4), "last_loss": round(losses[-1], 4),
            "step_s_median": round(med, 4), "tokens_per_s": round(tokens / med, 1)}, model


def check_generation(model: GPTModel, new_tokens: int = 30) -> dict:
    """Greedy decoding of the trained model, with and without the KV cache (bench's timing):
    the tokens must be identical."""
    res = bench.bench_generation(model, new_tokens, prompt_len=5, runs=1, seed=2)
    if not res["same_tokens_cache_vs_no_cache"]:
        raise AssertionError("the KV cache changed the generated tokens")
    return {"new_tokens": new_tokens, "tokens_per_s_cache": res["cache"]["tokens_per_s"],
            "tokens_per_s_no_cache": res["no_cache"]["tokens_per_s"]}


def check_bench(quick: bool) -> dict:
    config = TINY if quick else course_config()
    res = bench.bench(config, batch_size=2 if quick else 8, steps=3, warmup=1, backend_name=mg.get_backend(),
                      generation=False, matmul_size=256 if quick else None)
    return {"batch": f"{res['batch_size']}x{res['context_length']}",
            "step_s_median": round(res["time_s"]["step"]["median"], 4),
            "tokens_per_s": round(res["tokens_per_s"], 1),
            "fraction_of_matmul_rate": res["fraction_of_matmul_rate"]}


def run_test_suite() -> dict:
    """pytest's CuPy half, from a checkout (an installed package has no tests/ to run). Reported
    as pytest's summary ("12 passed in 30.1s") and, when some fail, the failing tests' names."""
    tests = Path(__file__).resolve().parents[2] / "tests"
    if not (tests / "conftest.py").is_file():
        return {"skipped": "no tests/ folder beside the package (run from a git checkout)"}
    proc = subprocess.run([sys.executable, "-m", "pytest", str(tests), "-q", "-k", "cupy", "-rfE",
                           "-p", "no:cacheprovider"], cwd=tests.parent, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    summary = next((ln.strip("= ") for ln in reversed(lines)
                    if re.search(r"\d+ (passed|failed|error|errors|skipped|deselected)\b", ln)),
                   "(no summary from pytest)")
    if proc.returncode != 0:
        failed = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
        raise AssertionError(f"pytest -k cupy: {summary}" + "".join(f"\n    {ln}" for ln in failed[:20]))
    return {"pytest": summary}


# ---------------------------------------------------------------------------------------------
# the whole run
# ---------------------------------------------------------------------------------------------

def selftest(backend_name: str = "cupy", quick: bool = False, tests: bool = True, out=None) -> dict:
    """Run every check on `backend_name`; return {"environment": ..., "checks": {name: result}}.

    Each result is {"ok": bool, ...figures} or {"ok": False, "error": "..."}; printing as it goes
    to `out` (a file, e.g. sys.stdout) when given.
    """
    mg.set_backend(backend_name)
    report = {"environment": environment(), "checks": {}}
    if out:
        env = report["environment"]
        print("minigrad-gpt2 selftest: " + ", ".join(f"{k} {v}" for k, v in env.items()), file=out)
    model = None

    def run(name, fn):
        t0 = time.perf_counter()
        try:
            figures = fn()
            result = {"ok": True, **figures}
        except Exception as exc:  # a failed check is reported, and the others still run
            detail = str(exc) if isinstance(exc, AssertionError) else "".join(
                traceback.format_exception_only(type(exc), exc)).strip()
            result = {"ok": False, "error": detail}
        result["seconds"] = round(time.perf_counter() - t0, 2)
        report["checks"][name] = result
        if out:
            shown = {k: v for k, v in result.items() if k != "ok"}
            print(f"  {'PASS' if result['ok'] else 'FAIL'}  {name:<11}" + "  ".join(
                f"{k}={v}" for k, v in shown.items()), file=out, flush=True)
        return result

    def training():
        nonlocal model
        figures, model = check_training(quick)
        return figures

    run("kernels", check_kernels)
    run("gradients", check_gradients)
    run("training", training)
    if model is not None:
        run("generation", lambda: check_generation(model))
    else:
        report["checks"]["generation"] = {"ok": False, "error": "no trained model (training failed)"}
    run("bench", lambda: check_bench(quick))
    if tests:
        run("test suite", run_test_suite)
    report["ok"] = all(c["ok"] for c in report["checks"].values())
    if out:
        passed = sum(c["ok"] for c in report["checks"].values())
        print(f"{'PASS' if report['ok'] else 'FAIL'}: {passed}/{len(report['checks'])} checks passed "
              f"on {report['environment']['device']}", file=out)
    return report


def add_arguments(parser) -> None:
    parser.add_argument("--backend", choices=["auto", "numpy", "cupy"],
                        default=default_backend() if os.environ.get("MINIGRAD_BACKEND") else "auto",
                        help="the backend to check: cupy (the GPU), numpy (the CPU), or auto: cupy when a "
                        "GPU can be used, else numpy (default: $MINIGRAD_BACKEND, else auto)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model and random tokens instead of the 124M course model on The "
                        "Verdict, and no pytest (seconds; no download)")
    parser.add_argument("--no-tests", action="store_true", help="skip running pytest's CuPy half")
    parser.add_argument("--json", action="store_true", help="also print the report as one JSON line")


def choose_backend(name: str, out=None) -> str:
    """"auto": cupy when a GPU can be used here, else numpy (saying why); otherwise `name`."""
    if name != "auto":
        return name
    try:
        mg.set_backend("cupy")
        return "cupy"
    except mg.BackendError as exc:
        if out:
            print(f"no GPU to check ({' '.join(str(exc).split(';')[0].split())}): checking the CPU (numpy); "
                  "--backend cupy insists on the GPU", file=out)
        return "numpy"
    finally:
        mg.set_backend("numpy")


def run(args) -> int:
    backend_name = choose_backend(args.backend, out=sys.stdout)
    tests = not args.no_tests and not args.quick
    try:
        report = selftest(backend_name, quick=args.quick, tests=tests, out=sys.stdout)
    finally:
        mg.set_backend("numpy")
    if args.json:
        print(json.dumps(report))
    if not report["ok"]:
        return 1
    return 0


__all__ = ["selftest", "environment", "check_kernels", "check_gradients", "check_training",
           "check_generation", "check_bench", "run_test_suite"]
