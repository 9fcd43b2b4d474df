"""Data parallelism: minigrad.distributed, ZeroAdamW and `mpiexec -n 2 python -m gpt2 train`.

The multi-rank tests start real MPI jobs (`mpiexec -n 2`) in subprocesses; they skip, saying
why, only where mpi4py or mpiexec is missing (`pip install -e ".[dev]"` brings both). The
equivalence targets: 2 ranks x batch B == 1 rank x batch 2B (losses and weights to float32
tolerance), ZeRO-1 == plain data parallel (bit for bit), a resumed 2-rank run == an
uninterrupted one (bit for bit), and a 2-rank run resumes on 1 rank.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import minigrad as mg
from minigrad import distributed
from minigrad.nn import Parameter
from minigrad.optim import AdamW
from minigrad.zero import ZeroAdamW

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "distributed_worker.py"
STANDIN_RUN = REPO / "tests" / "cupy_standin" / "run.py"


# ---------------------------------------------------------------------------------------------
# One process: the one-rank communicator and ZeroAdamW on one rank
# ---------------------------------------------------------------------------------------------

def test_single_process_collectives_are_copies():
    comm = distributed.SingleProcess()
    assert (comm.rank, comm.world_size, comm.local_rank) == (0, 1, 0)
    buf = np.arange(6, dtype=np.float32)
    assert comm.all_reduce_(buf) is buf and buf.tolist() == list(range(6))
    out = np.zeros(6, dtype=np.float32)
    comm.reduce_scatter(buf, out)
    assert out.tolist() == list(range(6))
    comm.all_gather_(buf[:3], out[:3])
    assert comm.all_reduce_scalars([2.5]).tolist() == [2.5]
    assert comm.any(True) and not comm.any(False)
    assert comm.all_gather_object("x") == ["x"] and comm.broadcast_object(3) == 3


def test_init_without_a_launcher_is_single_process(monkeypatch):
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        monkeypatch.delenv(var, raising=False)
    assert isinstance(distributed.init(), distributed.SingleProcess)
    monkeypatch.setenv("MINIGRAD_DIST_TIMEOUT", "soon")
    with pytest.raises(distributed.DistributedError, match="MINIGRAD_DIST_TIMEOUT"):
        distributed.init()


def test_flatten_and_unflatten_round_trip(backend):
    xp = mg.backend.xp
    arrays = [xp.arange(6, dtype=np.float32).reshape(2, 3), xp.ones(4, dtype=np.float32)]
    flat = distributed.flatten_into(arrays, xp.zeros(12, dtype=np.float32))
    assert mg.to_numpy(flat).tolist() == [0, 1, 2, 3, 4, 5, 1, 1, 1, 1, 0, 0]
    back = [xp.zeros_like(a) for a in arrays]
    distributed.unflatten_from(flat, back)
    assert all(np.array_equal(mg.to_numpy(a), mg.to_numpy(b)) for a, b in zip(arrays, back))


def test_zero_adamw_on_one_rank_is_adamw(backend):
    """With one rank the shard is everything: the same weights and checkpoint as AdamW, bit for bit,
    with clipping through the sharded norm."""
    xp = mg.backend.xp

    def params():
        g = np.random.default_rng(3)
        return [Parameter(xp.asarray(g.standard_normal(s).astype(np.float32))) for s in ((3, 4), (5,))]

    a, b = params(), params()
    ref = AdamW([{"params": a[:1]}, {"params": a[1:], "weight_decay": 0.0}], lr=0.05, weight_decay=0.1)
    zero = ZeroAdamW([{"params": b[:1]}, {"params": b[1:], "weight_decay": 0.0}], distributed.SingleProcess(),
                     lr=0.05, weight_decay=0.1)
    for step in range(3):
        for pa, pb in zip(a, b):
            g = xp.asarray(np.random.default_rng(step).standard_normal(pa.shape).astype(np.float32))
            pa.grad, pb.grad = g * 1, g * 1
        norm_ref = mg.optim.clip_grad_norm_(a, 1.0)
        ref.step()
        zero.reduce_gradients()
        assert abs(zero.clip_grad_norm_(1.0) - norm_ref) < 1e-5 * norm_ref
        zero.step()
        zero.zero_grad()
    for pa, pb in zip(a, b):
        assert np.array_equal(mg.to_numpy(pa.data), mg.to_numpy(pb.data))
    got, want = zero.state_dict(), ref.state_dict()
    assert got["groups"] == want["groups"] and got["step"] == want["step"] == 3
    for k in want["tensors"]:
        assert np.array_equal(mg.to_numpy(got["tensors"][k]), mg.to_numpy(want["tensors"][k]))
    assert zero.state_bytes() == 2 * 4 * (12 + 5)
    # and back: a fresh ZeroAdamW loading that checkpoint holds the same moments
    again = ZeroAdamW([{"params": b[:1]}, {"params": b[1:]}], distributed.SingleProcess(), lr=0.05)
    again.load_state_dict(got)
    assert np.array_equal(mg.to_numpy(again.m), mg.to_numpy(zero.m)) and again.step_count == 3


def test_zero_with_one_rank_is_a_one_line_error(tmp_path, capsys):
    from gpt2.cli import main

    code = main(["train", "--zero", "1", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--zero 1" in err and "mpiexec -n 2" in err


def test_a_signal_just_after_the_stop_vote_counts_at_the_next_step():
    """Every rank stops on the agreed vote, never on a flag its own signal set after the vote
    (that stopped one rank alone, and the others waited for it in the next all-reduce)."""
    from gpt2.cli.ranks import stop_asked_on_any_rank

    class Rank1:
        rank, world_size = 1, 2

        def all_reduce_scalars(self, values, op="sum"):
            stop["signal"] = stop["signal"] or signal.SIGTERM   # lands after this rank voted
            return np.array([max(values[0], 0)], dtype=np.float64)   # rank 0 voted 0

    stop = {"signal": None}
    assert not stop_asked_on_any_rank(Rank1(), stop)   # the vote said go on, as on rank 0
    assert stop["signal"] == signal.SIGTERM
    assert stop_asked_on_any_rank(Rank1(), stop)       # the next vote carries it: every rank stops


# ---------------------------------------------------------------------------------------------
# Several ranks: real MPI jobs
# ---------------------------------------------------------------------------------------------

def _mpiexec() -> str:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip('mpi4py is not installed (pip install -e ".[mpi]")')
    for candidate in (Path(sys.executable).parent / "mpiexec", Path(sys.base_prefix) / "bin" / "mpiexec"):
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("mpiexec")
    if found is None:
        pytest.skip('mpiexec is not on PATH (pip install -e ".[mpi]" installs MPICH\'s)')
    return found


def _env(**extra) -> dict:
    # (tests/conftest.py has put the offline vocabulary and story in the environment, if present)
    return {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MINIGRAD_DIST_TIMEOUT": "60", **extra}


def _run(cmd, timeout=120, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=_env(**env))


def _ok(result) -> str:
    assert result.returncode == 0, \
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_collectives_and_zero_on_two_ranks():
    out = _ok(_run([_mpiexec(), "-n", "2", sys.executable, str(WORKER), "collectives"]))
    assert "rank 0 ok (MPICommunicator, numpy)" in out and "rank 1 ok" in out


def test_nccl_collectives_and_zero_on_two_ranks_on_the_cupy_standin():
    """The NCCL path (device pointers, NCCL dtypes, the unique id over MPI, event polling) on the
    CuPy stand-in, whose cupy.cuda.nccl runs the collectives over MPI."""
    out = _ok(_run([_mpiexec(), "-n", "2", sys.executable, str(STANDIN_RUN), str(WORKER), "collectives"],
                   MINIGRAD_BACKEND="cupy"))
    assert "rank 0 ok (NCCLCommunicator, cupy)" in out and "rank 1 ok (NCCLCommunicator, cupy)" in out


@pytest.mark.gpu
def test_nccl_collectives_on_real_gpus():
    cupy = pytest.importorskip("cupy")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception:
        n = 0
    if n < 2:
        pytest.skip("needs 2 CUDA GPUs (NCCL puts one rank on each)")
    out = _ok(_run([_mpiexec(), "-n", "2", sys.executable, str(WORKER), "collectives"],
                   MINIGRAD_BACKEND="cupy"))
    assert "rank 1 ok (NCCLCommunicator, cupy)" in out


def test_standin_nccl_has_cupys_signatures():
    """tests/cupy_standin/_nccl.py (the stand-in's cupy.cuda.nccl) against the signatures compiled
    into the installed CuPy's NCCL module (readable from the extension's docstrings even where
    libnccl is missing)."""
    import importlib.util
    import inspect
    import re

    spec = importlib.util.find_spec("cupy_backends")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("CuPy is not installed")
    libs = Path(next(iter(spec.submodule_search_locations))) / "cuda" / "libs"
    compiled = [p for p in libs.glob("nccl*.so")] + [p for p in libs.glob("nccl*.pyd")]
    if not compiled:
        pytest.skip("this CuPy has no NCCL module")
    text = compiled[0].read_bytes().decode("latin-1")
    sys.path.insert(0, str(REPO / "tests"))
    from cupy_standin.cuda import nccl

    for name in ("allReduce", "reduceScatter", "allGather", "broadcast", "bcast"):
        found = re.search(rf"NcclCommunicator\.{name}\(self, ([^)]*)\)", text)
        assert found, name
        real = [arg.split()[-1] for arg in found.group(1).split(", ")]
        ours = list(inspect.signature(getattr(nccl.NcclCommunicator, name)).parameters)[1:]
        assert ours == real, (name, ours, real)
    found = re.search(r"NcclCommunicator\(int ndev, (\w+) commId, int rank, NcclConfig config=None\)", text)
    assert found and found.group(1) == "bytes"       # CuPy 14: the unique id is bytes
    assert list(inspect.signature(nccl.NcclCommunicator).parameters) == ["ndev", "commId", "rank", "config"]
    assert isinstance(nccl.get_unique_id(), bytes) and len(nccl.get_unique_id()) == 128
    real = pytest.importorskip("cupy")   # the real one: what else the NCCL path uses exists there
    assert hasattr(real.cuda.Stream, "record") and hasattr(real.cuda.Event, "done")


def test_chapter_08_runs_on_two_ranks():
    out = _ok(_run([_mpiexec(), "-n", "2", sys.executable, str(REPO / "chapters" / "08_data_parallel.py")]))
    assert "2 rank(s), communicator: MPICommunicator" in out and "chapter 08 done" in out


def test_a_hung_rank_makes_the_others_exit_with_a_clear_error():
    t0 = time.monotonic()
    result = _run([_mpiexec(), "-n", "2", sys.executable, str(WORKER), "hang"], timeout=60,
                  MINIGRAD_DIST_TIMEOUT="2")
    assert result.returncode != 0 and time.monotonic() - t0 < 50
    assert "rank 0 of 2: all-reduce waited 2 s for the other ranks" in result.stderr
    assert "stopping every rank" in result.stderr


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """A text for the CLI runs, and the GPT-2 vocabulary (both offline), else skip."""
    from gpt2_helpers import tokenizer_or_skip, verdict_or_skip

    tokenizer_or_skip()
    return verdict_or_skip()


TINY = ["--n-layers", "1", "--n-heads", "2", "--emb-dim", "32", "--context-length", "16", "--eval-every", "2",
        "--eval-iter", "1", "--sample-prompt", "", "--no-progress", "--seed", "5", "--save-every", "2"]


def _train(ranks: int, out: Path, story: Path, *flags, check=True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gpt2", "train", "--data", str(story), *TINY, "--out", str(out), *flags]
    if ranks:
        cmd = [_mpiexec(), "-n", str(ranks), *cmd]
    result = _run(cmd)
    if check:
        _ok(result)
    return result


def _weights(ckpt: Path) -> dict:
    from safetensors.numpy import load_file

    return {**load_file(ckpt / "model.safetensors"),
            **{"opt." + k: v for k, v in load_file(ckpt / "optimizer.safetensors").items()}}


def _losses(ckpt: Path) -> list:
    history = json.loads((ckpt / "trainer_state.json").read_text())["history"]
    return history["train_losses"] + history["val_losses"]


@pytest.fixture(scope="module")
def runs(story, tmp_path_factory):
    """4 steps of the same run four ways: 1 rank x batch 4, 1 rank x batch 2 x --grad-accum 2,
    2 ranks x batch 2, and the latter with ZeRO-1 (dropout 0: dropout masks cannot match between
    different batch splits)."""
    root = tmp_path_factory.mktemp("dp")
    _train(0, root / "one", story, "--batch-size", "4", "--max-steps", "4", "--dropout", "0")
    _train(2, root / "two", story, "--batch-size", "2", "--max-steps", "4", "--dropout", "0")
    _train(0, root / "accum", story, "--batch-size", "2", "--grad-accum", "2", "--max-steps", "4",
           "--dropout", "0")
    log = _train(2, root / "zero", story, "--batch-size", "2", "--max-steps", "4", "--dropout", "0",
                 "--zero", "1").stdout
    return root, log


def test_two_ranks_equal_one_rank_with_the_global_batch(runs):
    root, _ = runs
    one, two = _weights(root / "one" / "ckpt-000004"), _weights(root / "two" / "ckpt-000004")
    assert one.keys() == two.keys()
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(_losses(root / "two" / "ckpt-000004"), _losses(root / "one" / "ckpt-000004"),
                               rtol=1e-6)
    state = json.loads((root / "two" / "ckpt-000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["rank_rng_states"]) == 2 and state["tokens_seen"] == 4 * 64


def test_two_ranks_equal_one_rank_with_gradient_accumulation(runs):
    root, _ = runs
    accum, two = _weights(root / "accum" / "ckpt-000004"), _weights(root / "two" / "ckpt-000004")
    for name in accum:
        np.testing.assert_allclose(two[name], accum[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # (the logged losses are not compared: evaluation averages --eval-iter loader batches, of 2
    # windows here and of 4 on 2 ranks, so they cover different windows)


def test_zero_equals_plain_data_parallel_bit_for_bit(runs):
    root, log = runs
    two, zero = _weights(root / "two" / "ckpt-000004"), _weights(root / "zero" / "ckpt-000004")
    assert all(np.array_equal(zero[k], two[k]) for k in two)    # moments included: the same file
    assert "global batch 4" in log and "ZeRO-1: AdamW moments" in log
    per_rank, full = (float(x) for x in
                      log.split("AdamW moments ")[1].replace(" MiB per rank (unsharded:", "").split()[:2])
    assert abs(per_rank - full / 2) < 0.1                       # memory per rank: half


def test_nccl_two_ranks_equal_one_rank_on_the_cupy_standin(story, tmp_path):
    """`--backend cupy` on 2 ranks (NCCL, ZeRO-1) against 1 rank with the global batch, both on the
    stand-in (the same initial weights: CuPy's generator differs from NumPy's)."""
    def train(ranks, out, *flags):
        cmd = [sys.executable, str(STANDIN_RUN), "-m", "gpt2", "train", "--data", str(story), *TINY,
               "--backend", "cupy", "--max-steps", "2", "--dropout", "0", "--out", str(out), *flags]
        return _ok(_run([_mpiexec(), "-n", str(ranks), *cmd] if ranks else cmd))

    train(0, tmp_path / "one", "--batch-size", "4")
    log = train(2, tmp_path / "two", "--batch-size", "2", "--zero", "1")
    assert "data parallel: 2 ranks (nccl)" in log
    one, two = _weights(tmp_path / "one" / "ckpt-000002"), _weights(tmp_path / "two" / "ckpt-000002")
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_resume_on_two_ranks_is_exact_and_on_one_rank_continues(runs, story):
    """With dropout on (each rank its own masks, saved per rank): stop at step 2 and resume on 2
    ranks == the uninterrupted 4 steps, bit for bit; resuming the 2-rank run on 1 rank works too."""
    root, _ = runs
    straight, part = root / "straight", root / "part"
    _train(2, straight, story, "--batch-size", "2", "--max-steps", "4", "--zero", "1")
    _train(2, part, story, "--batch-size", "2", "--max-steps", "2")
    _train(2, part, story, "--resume", str(part), "--max-steps", "4", "--zero", "1")
    a, b = _weights(straight / "ckpt-000004"), _weights(part / "ckpt-000004")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    single = root / "single"
    log = _train(0, single, story, "--resume", str(part / "ckpt-000002"), "--max-steps", "3").stdout
    assert "trained on 2 rank(s) and continues on 1" in log
    state = json.loads((single / "ckpt-000003" / "trainer_state.json").read_text())
    # 2 steps of 2 x 2 windows = 4 batches of 2 on one rank, then one more step
    assert state["step"] == 3 and state["loader"]["batch_size"] == 2 and state["loader"]["batch_index"] == 5


def test_every_rank_draws_its_own_dropout_masks(story, tmp_path):
    """What the ranks really used: the generators they trained with (gathered into the checkpoint)
    are distinct streams, so each rank's dropout masks differ; rank 0's is the checkpoint's own."""
    import minigrad as mg
    from minigrad import functional as F

    _train(2, tmp_path / "run", story, "--batch-size", "1", "--max-steps", "2", "--dropout", "0.5")
    state = json.loads((tmp_path / "run" / "ckpt-000002" / "trainer_state.json").read_text())
    rank_states = state["rank_rng_states"]
    assert len(rank_states) == 2 and rank_states[0] == state["rng_state"]
    masks = []
    saved = mg.get_rng_state()
    try:
        for rank_state in rank_states:
            mg.set_rng_state(rank_state)
            masks.append(F.dropout(mg.Tensor(np.ones(4096, dtype=np.float32)), 0.5).numpy() > 0)
    finally:
        mg.set_rng_state(saved)
    assert 0.4 < masks[0].mean() < 0.6 and 0.4 < masks[1].mean() < 0.6
    assert (masks[0] != masks[1]).mean() > 0.4            # independent streams: about half differ


def test_flags_that_differ_between_ranks_are_one_error(story, tmp_path):
    base = [sys.executable, "-m", "gpt2", "train", "--data", str(story), *TINY, "--out", str(tmp_path / "o")]
    result = _run([_mpiexec(), "-n", "1", *base, "--lr", "0.001", ":", "-n", "1", *base, "--lr", "0.002"])
    assert result.returncode == 2
    assert result.stderr.count("error:") == 1 and "different flags" in result.stderr
    assert "--lr 0.002 (rank 0: 0.001)" in result.stderr
    assert not (tmp_path / "o").exists()


def test_the_nan_guard_stops_every_rank_with_one_error(story, tmp_path):
    result = _train(2, tmp_path / "o", story, "--batch-size", "2", "--max-steps", "5", "--lr", "1e30",
                    "--zero", "1", check=False)
    assert result.returncode == 2 and result.stderr.count("error:") == 1, result.stderr
    assert "the loss became nan at step 1" in result.stderr


def test_a_bad_flag_under_mpiexec_is_one_line():
    result = _run([_mpiexec(), "-n", "2", sys.executable, "-m", "gpt2", "train", "--zero", "3"])
    assert result.returncode == 2 and result.stderr.count("error:") == 1 and "--zero" in result.stderr


def test_an_error_on_one_rank_only_is_reported_once_by_rank_0(story, tmp_path):
    base = [sys.executable, "-m", "gpt2", "train", *TINY, "--out", str(tmp_path / "o")]
    result = _run([_mpiexec(), "-n", "1", *base, "--data", str(story), ":",
                   "-n", "1", *base, "--data", str(tmp_path / "missing.txt")])
    assert result.returncode == 2 and result.stderr.count("error:") == 1
    assert "rank 1: data file" in result.stderr and "missing.txt" in result.stderr


def test_too_little_data_for_every_rank_is_one_error(tmp_path):
    _mpiexec()
    from gpt2_helpers import tokenizer_or_skip

    tokenizer_or_skip()
    text = tmp_path / "short.txt"
    text.write_text("one two three four five six seven eight nine ten. " * 19)   # 11 windows of 16
    result = _run([_mpiexec(), "-n", "2", sys.executable, "-m", "gpt2", "train", "--data", str(text), *TINY,
                   "--batch-size", "8", "--out", str(tmp_path / "o")])   # one rank could: 11 >= 8
    assert result.returncode == 2 and result.stderr.count("error:") == 1, result.stderr
    assert "2 ranks" in result.stderr and "--batch-size 8" in result.stderr


def test_sigterm_on_one_rank_saves_once_and_stops_every_rank(story, tmp_path):
    """SIGTERM to rank 1 only: both ranks stop after the same step, rank 0 saves, exit 143."""
    out = tmp_path / "run"
    cmd = [_mpiexec(), "-n", "2", sys.executable, "-m", "gpt2", "train", "--data", str(story), *TINY,
           "--batch-size", "2", "--save-every", "1000", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    try:
        deadline = time.monotonic() + 60
        rank1 = None
        while rank1 is None and time.monotonic() < deadline:   # find rank 1 once it is training
            time.sleep(0.2)
            for p in Path("/proc").iterdir():
                try:
                    if str(out) in (p / "cmdline").read_text() and \
                            b"PMI_RANK=1\x00" in (p / "environ").read_bytes():
                        rank1 = int(p.name)
                except (OSError, ValueError):
                    continue
        assert rank1 is not None, "rank 1 did not start"
        time.sleep(3)     # into the training loop
        os.kill(rank1, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stdout.count("saved checkpoint") == 1 and "SIGTERM: training stopped" in stderr
    latest = (out / "latest").read_text().strip()
    state = json.loads((out / latest / "trainer_state.json").read_text())
    assert state["step"] >= 1 and state["world_size"] == 2
