"""Bad input everywhere: every CLI flag and public function rejects nonsense with a clear message.

The CLI: exit code 2 and exactly one line on stderr, `error: ...`, naming the flag -- never a
traceback, and nothing written to --out. Functions: GPT2Error (or minigrad's BackendError for the
engine's own backend switch) with a message that names the problem.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gpt2_helpers import ByteTokenizer, tiny_model, tokenizer_or_skip

import minigrad as mg
from gpt2 import GPT2Error, GPTConfig, generate
from gpt2.checkpoint import save_checkpoint, save_run_checkpoint
from gpt2.cli import main
from gpt2.data import DataLoader, GPTDataset, create_loaders, read_text, split_text
from gpt2.pretrained import export_hf, load_pretrained
from gpt2.train import TrainConfig, make_optimizer, train

REPO = Path(__file__).resolve().parent.parent
STORY = ("I HAD always thought Jack Gisburn rather a cheap genius--though a good fellow enough--so it "
         "was no great surprise to me to hear that, in the height of his glory, he had dropped his "
         "painting. ") * 8
TINY = ["--n-layers", "1", "--n-heads", "2", "--emb-dim", "16", "--context-length", "16"]




@pytest.fixture
def files(tmp_path):
    f = {"story": tmp_path / "story.txt", "empty": tmp_path / "empty.txt", "blank": tmp_path / "blank.txt",
         "binary": tmp_path / "model.bin", "latin1": tmp_path / "latin1.txt", "short": tmp_path / "short.txt",
         "dir": tmp_path / "a-directory", "missing": tmp_path / "missing.txt"}
    f["story"].write_text(STORY, encoding="utf-8")
    f["empty"].write_bytes(b"")
    f["blank"].write_text(" \n\t\n")
    f["binary"].write_bytes(bytes(range(256)) * 4)
    f["latin1"].write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e ".encode("latin-1") * 40)
    f["short"].write_text("Far too short for one window.")
    f["dir"].mkdir()
    return f


def _one_error_line(capsys, argv, *fragments):
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (argv, code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------
# train: data files
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which, fragment", [
    ("empty", "is empty"), ("blank", "is empty"), ("binary", "looks binary"), ("latin1", "not valid UTF-8"),
    ("dir", "not a prepared dataset"), ("missing", "does not exist"), ("short", "too few"),
])
def test_train_rejects_bad_data_files(tmp_path, files, capsys, which, fragment):
    if which == "short":
        tokenizer_or_skip()
    out = tmp_path / "out"
    _one_error_line(capsys, ["train", "--data", str(files[which]), *TINY, "--out", str(out)], fragment,
                    str(files[which]))
    assert not out.exists()


@pytest.mark.parametrize("which, fragment", [
    ("empty", "is empty"), ("blank", "is empty"), ("binary", "looks binary"), ("latin1", "not valid UTF-8"),
    ("dir", "not a file"), ("missing", "does not exist"),
])
def test_read_text_rejects_bad_data_files(files, which, fragment):
    with pytest.raises(GPT2Error, match=fragment):
        read_text(files[which])


def test_data_shorter_than_one_window():
    ids = list(range(10))
    with pytest.raises(GPT2Error, match="10 tokens, too few for one window of 16"):
        GPTDataset(ids, max_length=16, stride=16)
    with pytest.raises(GPT2Error, match="training split.*too few"):
        create_loaders("tiny text", batch_size=1, max_length=32, tokenizer=ByteTokenizer())
    ds = GPTDataset(list(range(40)), max_length=8, stride=8)
    with pytest.raises(GPT2Error, match="cannot fill one batch"):
        DataLoader(ds, batch_size=100, drop_last=True)


# ---------------------------------------------------------------------------------------------
# train: sizes and numbers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, fragments", [
    (["--context-length", "2048"], ["--context-length 2048", "1024"]),   # longer than the model's
    (["--context-length", "0"], ["--context-length", "positive"]),
    (["--context-length", "-8"], ["--context-length"]),
    (["--n-layers", "0"], ["--n-layers", "positive"]),
    (["--n-heads", "0"], ["--n-heads"]),
    (["--n-heads", "3"], ["divisible"]),
    (["--emb-dim", "-16"], ["--emb-dim"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--batch-size", "-2"], ["--batch-size"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--max-steps", "-1"], ["--max-steps"]),
    (["--eval-every", "0"], ["--eval-every"]),
    (["--eval-iter", "0"], ["--eval-iter"]),
    (["--save-every", "0"], ["--save-every"]),
    (["--keep", "0"], ["--keep"]),
    (["--warmup-steps", "-1"], ["--warmup-steps"]),
    (["--lr", "0"], ["--lr"]),
    (["--lr", "-1e-3"], ["--lr"]),
    (["--lr", "inf"], ["--lr", "finite"]),
    (["--lr", "nan"], ["--lr"]),
    (["--weight-decay", "-0.1"], ["--weight-decay"]),
    (["--grad-clip", "-1"], ["--grad-clip"]),
    (["--dropout", "1.0"], ["--dropout", "[0, 1)"]),
    (["--dropout", "-0.1"], ["--dropout"]),
    (["--seed", "-1"], ["--seed", ">= 0"]),
    (["--backend", "tpu"], ["--backend", "invalid choice"]),          # unknown backend
    (["--model", "gpt5"], ["--model", "invalid choice"]),
    (["--lr", "fast"], ["--lr", "invalid float"]),
    (["--epochs", "2.5"], ["--epochs", "invalid int"]),
    (["--bogus"], ["train has no flag --bogus", "train --help"]),
    (["--grad-accum", "0"], ["--grad-accum", "positive"]),
    (["--grad-accum", "-2"], ["--grad-accum"]),
    (["--eval-iters", "0"], ["--eval-iter"]),
    (["--min-lr", "1e-5"], ["--min-lr", "--warmup-steps"]),                # no schedule to end
    (["--warmup-steps", "10", "--min-lr", "1"], ["--min-lr", "between 0 and --lr"]),
    (["--warmup-steps", "10", "--min-lr", "-1e-5"], ["--min-lr"]),
    (["--warmup-steps", "10", "--min-lr", "nan"], ["--min-lr", "finite"]),
    (["--beta2", "1"], ["--beta2", "[0, 1)"]),
    (["--beta2", "-0.1"], ["--beta2"]),
    (["--beta2", "inf"], ["--beta2", "finite"]),
    (["--grad-accum", "1000"], ["--grad-accum 1000"]),                     # more than an epoch's batches
])
def test_train_rejects_bad_flags(tmp_path, files, capsys, flags, fragments):
    if flags[0] == "--grad-accum":
        tokenizer_or_skip()   # counting an epoch's batches needs the text tokenized
    out = tmp_path / "out"
    _one_error_line(capsys, ["train", "--data", str(files["story"]), *TINY, "--out", str(out), *flags],
                    *fragments)
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "generate"])
def test_missing_cuda_is_one_line_with_the_install_hint(tmp_path, files, capsys, command, cupy_not_installed):
    if command == "train":
        argv = ["train", "--data", str(files["story"]), *TINY, "--out", str(tmp_path / "o"),
                "--backend", "cupy"]
    else:
        save_checkpoint(tmp_path / "c", tiny_model(vocab_size=50257))
        argv = ["generate", "--checkpoint", str(tmp_path / "c"), "--prompt", "Hi", "--backend", "cupy"]
    _one_error_line(capsys, argv, "backend 'cupy' needs CuPy", "pip install", "cuda12")
    assert not (tmp_path / "o").exists()


def test_unknown_and_missing_backends_in_functions(tmp_path, cupy_not_installed):
    with pytest.raises(mg.BackendError, match="unknown backend 'tpu'"):
        mg.set_backend("tpu")
    assert mg.get_backend() == "numpy"
    export_hf(tiny_model(), tmp_path / "hf")
    with pytest.raises(GPT2Error, match="unknown backend 'tpu'"):
        load_pretrained(tmp_path / "hf", backend="tpu")
    with pytest.raises(GPT2Error, match="dtype must be one of"):
        load_pretrained(tmp_path / "hf", dtype="int8")
    with pytest.raises(GPT2Error, match="pip install"):
        load_pretrained(tmp_path / "hf", backend="cupy")
    assert mg.get_backend() == "numpy"


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, tiny_model(vocab_size=50257))
    return path


@pytest.mark.parametrize("flags, fragments", [
    (["--temperature", "-0.5"], ["--temperature", ">= 0"]),
    (["--temperature", "nan"], ["--temperature"]),
    (["--temperature", "inf"], ["--temperature"]),
    (["--top-p", "0"], ["--top-p", "(0, 1]"]),
    (["--top-p", "1.01"], ["--top-p", "(0, 1]"]),
    (["--top-p", "-0.5"], ["--top-p"]),
    (["--top-p", "nan"], ["--top-p"]),
    (["--top-k", "0"], ["--top-k"]),
    (["--top-k", "-3"], ["--top-k"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["--max-new-tokens", "-5"], ["--max-new-tokens"]),
    (["--seed", "-2"], ["--seed"]),
    (["--prompt", ""], ["--prompt", "empty"]),
    (["--backend", "tpu"], ["--backend", "invalid choice"]),
])
def test_generate_rejects_bad_flags(ckpt, capsys, flags, fragments):
    _one_error_line(capsys, ["generate", "--checkpoint", str(ckpt), "--prompt", "Hello", *flags], *fragments)


def test_generate_rejects_bad_sources(tmp_path, ckpt, capsys):
    tokenizer_or_skip()
    (tmp_path / "file.txt").write_text("x")
    for source, fragment in ((tmp_path / "nope", "does not exist"), (tmp_path / "file.txt", "does not exist"),
                             (tmp_path, "not a checkpoint")):
        _one_error_line(capsys, ["generate", "--checkpoint", str(source), "--prompt", "Hi"], fragment)
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    _one_error_line(capsys, ["generate", "--checkpoint", str(ckpt), "--prompt", "Hi"], "model.safetensors",
                    "not a safetensors file")
    _one_error_line(capsys, ["generate", "--pretrained", "gpt-7", "--prompt", "Hi"],
                    "unknown pretrained model")


def test_generate_function_rejects_nonsense():
    model = tiny_model()
    ids = np.array([[1, 2, 3]])
    for kwargs, pattern in ((dict(temperature=-1.0), "temperature"),
                            (dict(temperature=float("nan")), "temperature"), (dict(top_p=0.0), "top_p"),
                            (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"),
                            (dict(max_new_tokens=-1), "max_new_tokens")):
        kwargs = {"max_new_tokens": 3, **kwargs}
        with pytest.raises(GPT2Error, match=pattern):
            generate(model, ids, **kwargs)
    with pytest.raises(GPT2Error, match="at least one token"):
        generate(model, np.zeros((1, 0), dtype=np.int64), 3)
    with pytest.raises(GPT2Error, match="outside the vocabulary"):
        generate(model, np.array([[1, 64]]), 3)
    with pytest.raises(GPT2Error, match="integers"):
        model(np.array([[0.5, 1.0]]))


# ---------------------------------------------------------------------------------------------
# public functions: sizes, context, training settings
# ---------------------------------------------------------------------------------------------

def test_context_longer_than_the_model():
    model = tiny_model(context_length=16)
    with pytest.raises(GPT2Error, match="longer than the model's context length 16"):
        model(np.zeros((1, 17), dtype=np.int64))
    train_loader, val_loader = create_loaders(STORY, batch_size=2, max_length=32, tokenizer=ByteTokenizer())
    model = tiny_model(vocab_size=256, context_length=16)
    with pytest.raises(GPT2Error, match="windows are 32 tokens long, more than the model's context length"):
        train(model, train_loader, val_loader, make_optimizer(model), TrainConfig(progress=False))


@pytest.mark.parametrize("make", [
    lambda: GPTConfig(emb_dim=0), lambda: GPTConfig(n_layers=-1), lambda: GPTConfig(n_heads=0),
    lambda: GPTConfig(vocab_size=2.5), lambda: GPTConfig(context_length=True),
    lambda: GPTConfig(dropout=1.0), lambda: GPTConfig(dropout="0.1"), lambda: GPTConfig(qkv_bias="no"),
    lambda: GPTConfig(emb_dim=10, n_heads=3),
    lambda: GPTDataset([1, 2, 3], max_length=0, stride=1), lambda: GPTDataset(list(range(50)), 8, stride=-1),
    lambda: DataLoader(GPTDataset(list(range(50)), 8, 8), batch_size=0),
    lambda: split_text("abc", train_ratio=1.5),
    lambda: TrainConfig(epochs=0), lambda: TrainConfig(eval_every=-1), lambda: TrainConfig(max_steps=0),
    lambda: TrainConfig(grad_clip=-1.0), lambda: TrainConfig(warmup_steps=-2),
    lambda: TrainConfig(eval_iter=0),
    lambda: make_optimizer(tiny_model(), lr=0.0), lambda: make_optimizer(tiny_model(), lr=float("nan")),
    lambda: make_optimizer(tiny_model(), weight_decay=-1.0),
])
def test_public_functions_reject_nonsense(make):
    with pytest.raises(GPT2Error) as e:
        make()
    assert len(str(e.value)) > 15


def test_checkpoint_functions_reject_nonsense(tmp_path):
    model = tiny_model()
    (tmp_path / "file").write_text("x")
    with pytest.raises(GPT2Error, match="not a directory"):
        save_run_checkpoint(tmp_path / "file", model, step=1)
    with pytest.raises(GPT2Error, match="keep must be a positive integer"):
        save_run_checkpoint(tmp_path / "run", model, step=1, keep=-1)
    with pytest.raises(GPT2Error, match="step must be an integer"):
        save_run_checkpoint(tmp_path / "run", model, step=-5)


# ---------------------------------------------------------------------------------------------
# a real process: the one line, and nothing else
# ---------------------------------------------------------------------------------------------

def test_real_process_errors_are_one_line(tmp_path, files):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for argv in (["train", "--data", str(files["binary"]), "--out", str(tmp_path / "o")],
                 ["train", "--batch-size", "0"],
                 ["generate", "--checkpoint", str(tmp_path), "--prompt", "hi", "--top-p", "2"],
                 ["generate", "--prompt", "hi"]):
        result = subprocess.run([sys.executable, "-m", "gpt2", *argv], cwd=tmp_path, capture_output=True,
                                text=True, env=env, timeout=60)
        assert result.returncode == 2, (argv, result.stderr)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, fragments", [
    (["--val-fraction", "0"], ["--val-fraction", "(0, 1)"]),
    (["--val-fraction", "1"], ["--val-fraction"]),
    (["--val-fraction", "nan"], ["--val-fraction", "finite"]),
    (["--val-fraction", "-0.1"], ["--val-fraction"]),
    (["--workers", "0"], ["--workers", "positive"]),
    (["--tokenizer", "bpe"], ["--tokenizer", "invalid choice"]),
])
def test_prepare_rejects_bad_flags(tmp_path, files, capsys, flags, fragments):
    out = tmp_path / "ds"
    argv = ["prepare", str(files["story"]), "--tokenizer", "char", "--out", str(out), *flags]
    _one_error_line(capsys, argv, *fragments)
    assert not out.exists()


@pytest.mark.parametrize("which, fragment", [
    ("binary", "looks binary"), ("latin1", "not valid UTF-8"), ("missing", "does not exist"),
    ("dir", "has no files"), ("empty", "empty"),
])
def test_prepare_rejects_bad_sources(tmp_path, files, capsys, which, fragment):
    out = tmp_path / "ds"
    _one_error_line(capsys, ["prepare", str(files[which]), "--tokenizer", "char", "--out", str(out),
                             "--no-progress"], fragment)
    assert not out.exists()


def test_prepare_never_replaces_what_is_not_its_own(tmp_path, files, capsys):
    out = tmp_path / "ds"
    argv = ["prepare", str(files["story"]), "--tokenizer", "char", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    _one_error_line(capsys, argv, "already holds a prepared dataset", "--overwrite")
    _one_error_line(capsys, [*argv[:-1], str(files["story"])], "not a folder")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    _one_error_line(capsys, [*argv[:-1], str(mine), "--overwrite"], "not a prepared dataset")
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_train_on_a_damaged_prepared_dataset_is_one_line(tmp_path, files, capsys):
    ds = tmp_path / "ds"
    assert main(["prepare", str(files["story"]), "--tokenizer", "char", "--no-progress", "--out",
                 str(ds)]) == 0
    (ds / "val-00000.bin").write_bytes(b"\x01")
    _one_error_line(capsys, ["train", "--data", str(ds), *TINY, "--out", str(tmp_path / "out")],
                    "val-00000.bin", "prepare the dataset again")
    assert not (tmp_path / "out").exists()
