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
from gpt2.checkpoint import save_checkpoint
from gpt2.cli import main
from gpt2.data import DataLoader, GPTDataset, create_loaders, read_text, split_text
from gpt2.pretrained import export_hf, load_pretrained
from gpt2.run_dir import save_run_checkpoint
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


# ---------------------------------------------------------------------------------------------
# a newcomer's mistakes: unknown flags, nanoGPT's spellings, messages in the flags' words
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, fragments", [
    (["train", "--steps", "3"], ["train has no flag --steps", "did you mean --max-steps",
                                 "python -m gpt2 train --help"]),
    (["generate", "--checkpoint", "x", "--prompt", "Hi", "--temprature", "0.5"],
     ["generate has no flag --temprature", "did you mean --temperature", "generate --help"]),
    (["prepare", "verdict", "--out", "x", "--tokeniser", "char"], ["did you mean --tokenizer"]),
    (["eval", "--checkpoint", "x", "--data", "y", "--splits", "val"], ["did you mean --split"]),
    (["train", "stray"], ["unexpected argument(s): stray", "train --help"]),
])
def test_unknown_flags_point_at_the_commands_help_with_a_suggestion(capsys, argv, fragments):
    _one_error_line(capsys, argv, *fragments)


def test_nanogpt_spellings_are_accepted(tmp_path, files, capsys):
    """README promises nanoGPT's spellings: --n_layer=4, --max_steps, --max_iters, --block_size."""
    from gpt2.cli.main import build_parser, normalize_argv

    parser = build_parser()
    argv = normalize_argv(parser, ["train", "--n_layer=4", "--n_head", "2", "--n_embd=16", "--max_steps", "7",
                                   "--block_size=32", "--learning_rate", "0.001", "--sample-prompt=--x_y"])
    args = parser.parse_args(argv)
    assert (args.n_layers, args.n_heads, args.emb_dim, args.max_steps, args.context_length, args.lr) == \
        (4, 2, 16, 7, 32, 0.001)
    assert args.sample_prompt == "--x_y"   # a value, not a flag: left alone
    assert parser.parse_args(normalize_argv(parser, ["train", "--max_iters=9"])).max_steps == 9


@pytest.mark.parametrize("flags, fragments", [
    (["--emb-dim", "60", "--n-heads", "7"], ["--emb-dim (60) must be divisible by --n-heads (7)"]),
    (["--n-heads", "5"], ["--emb-dim (768) must be divisible by --n-heads (5)", "--model gpt2-124m"]),
])
def test_model_shape_errors_name_flags_not_fields(tmp_path, files, capsys, flags, fragments):
    line = _one_error_line(capsys, ["train", "--data", str(files["story"]), "--out", str(tmp_path / "o"),
                                    *flags], *fragments)
    assert "emb_dim" not in line and "n_heads" not in line


def test_warmup_longer_than_the_run_is_refused(tmp_path, files, capsys):
    tokenizer_or_skip()
    _one_error_line(capsys, ["train", "--data", str(files["story"]), *TINY, "--out", str(tmp_path / "o"),
                             "--max-steps", "3", "--warmup-steps", "10"],
                    "--warmup-steps 10 is more than the run's 3 steps", "at most --warmup-steps 3")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# nothing a user saved is deleted or replaced
# ---------------------------------------------------------------------------------------------

def test_keep_best_never_replaces_a_best_folder_that_is_not_ours(tmp_path, files, capsys):
    out = tmp_path / "run"
    (out / "best").mkdir(parents=True)
    (out / "best" / "my-notes.txt").write_text("keep")
    for extra in ([], ["--overwrite"]):
        _one_error_line(capsys, ["train", "--data", str(files["story"]), *TINY, "--out", str(out),
                                 "--keep-best", *extra], str(out / "best"), "not a checkpoint")
    assert (out / "best" / "my-notes.txt").read_text() == "keep"


def test_train_overwrite_removes_only_the_runs_own_files(tmp_path, files, capsys):
    tokenizer_or_skip()
    out = tmp_path / "run"
    argv = ["train", "--data", str(files["story"]), *TINY, "--max-steps", "1", "--out", str(out),
            "--no-progress", "--sample-prompt", ""]
    assert main(argv) == 0
    (out / "config.json").write_text('{"my": "settings"}')   # a file of the user's own, whatever its name
    (out / "notes.txt").write_text("mine")
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "config.json").read_text() == '{"my": "settings"}'
    assert (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in out.glob("ckpt-*")] == ["ckpt-000001"]


def test_overwrite_keeps_the_users_files_in_a_dataset_folder(tmp_path, files, capsys):
    out = tmp_path / "ds"
    argv = ["prepare", str(files["story"]), "--tokenizer", "char", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    (out / "README.txt").write_text("my notes")
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "README.txt").read_text() == "my notes"


# ---------------------------------------------------------------------------------------------
# damaged datasets: refused naming the file, with the fix, before the model sees them
# ---------------------------------------------------------------------------------------------

def _char_dataset(tmp_path, files):
    ds = tmp_path / "ds"
    assert main(["prepare", str(files["story"]), "--tokenizer", "char", "--no-progress", "--out",
                 str(ds)]) == 0
    return ds


def test_ids_beyond_the_vocabulary_name_the_shard(tmp_path, files, capsys):
    ds = _char_dataset(tmp_path, files)
    shard = ds / "train-00000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[::7] = 60000
    ids.tofile(shard)
    _one_error_line(capsys, ["train", "--data", str(ds), *TINY, "--out", str(tmp_path / "out"), "--max-steps",
                             "1"], str(shard), "beyond the dataset's vocabulary", "prepare the dataset again")


def test_an_edited_manifest_is_refused_naming_the_file(tmp_path, files, capsys):
    import json

    ds = _char_dataset(tmp_path, files)
    m = json.loads((ds / "manifest.json").read_text())
    m["tokenizer"]["chars"] = m["tokenizer"]["chars"][:10]     # a shorter vocabulary than the ids use
    m["vocab_size"] = 10
    (ds / "manifest.json").write_text(json.dumps(m))
    _one_error_line(capsys, ["train", "--data", str(ds), *TINY, "--out", str(tmp_path / "out"), "--max-steps",
                             "1"], "train-00000.bin", "beyond the dataset's vocabulary of 10")
    m["vocab_size"] = 11
    (ds / "manifest.json").write_text(json.dumps(m))
    _one_error_line(capsys, ["train", "--data", str(ds), *TINY, "--out", str(tmp_path / "out")],
                    "manifest.json", "vocab_size 11", "prepare the dataset again")


# ---------------------------------------------------------------------------------------------
# environment variables and offline set-up
# ---------------------------------------------------------------------------------------------

def test_tokenizer_from_plain_vocab_files_and_a_clear_offline_error(tmp_path, monkeypatch):
    """TIKTOKEN_CACHE_DIR may hold vocab.bpe and encoder.json under their own names; a folder
    without them is one line naming both forms, not cut mid-word."""
    from gpt2 import tokenizer as tk

    real = tokenizer_or_skip()
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not cache or not all((Path(cache) / h).is_file() for h in tk.TIKTOKEN_CACHE_FILES.values()):
        pytest.skip("needs tiktoken's cache of the GPT-2 vocabulary in TIKTOKEN_CACHE_DIR")
    plain = tmp_path / "plain"
    plain.mkdir()
    for name, hashed in tk.TIKTOKEN_CACHE_FILES.items():
        (plain / name).write_bytes((Path(cache) / hashed).read_bytes())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(plain))
    tk.get_tokenizer.cache_clear()
    try:
        tok = tk.get_tokenizer()
        text = "Hello, caf\u00e9 \U0001f600 <|endoftext|> world"
        assert tok.encode(text) == real.encode(text) and tok.n_vocab == 50257
        empty = tmp_path / "empty"
        empty.mkdir()
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(empty))
        monkeypatch.setattr("tiktoken.registry.ENCODINGS", {})   # tiktoken's own cache of built encodings
        monkeypatch.setattr("tiktoken.load.read_file",
                            lambda *a, **k: (_ for _ in ()).throw(OSError("no network " + "word " * 80)))
        tk.get_tokenizer.cache_clear()
        with pytest.raises(GPT2Error) as info:
            tk.get_tokenizer()
        msg = str(info.value)
        assert "vocab.bpe and encoder.json" in msg and "6d1cbeee" in msg
        assert f"TIKTOKEN_CACHE_DIR={empty}" in msg
        assert "word ..." in msg and "wor)" not in msg   # cut between words
    finally:
        tk.get_tokenizer.cache_clear()


@pytest.mark.parametrize("env, fragments", [
    ({"MINIGRAD_NUM_THREADS": "many"}, ["MINIGRAD_NUM_THREADS='many'", "unset it"]),
    ({"GPT2_DATA": "/no/such/verdict.txt"}, ["GPT2_DATA=/no/such/verdict.txt is not a file", "unset"]),
    ({"GPT2_DATA_MIRROR": "/no/such/mirror"}, ["GPT2_DATA_MIRROR=/no/such/mirror is not a folder"]),
])
def test_bad_environment_variables_are_one_line(tmp_path, env, fragments):
    """In a real process (the thread count is read once per process)."""
    full = {**os.environ, "PYTHONPATH": str(REPO), "GPT2_DATA_DIR": str(tmp_path / "data"), **env}
    res = subprocess.run([sys.executable, "-m", "gpt2", "train", *TINY, "--max-steps", "1", "--out",
                          str(tmp_path / "o"), "--no-progress"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=full)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bench_shape_errors_name_flags(capsys):
    _one_error_line(capsys, ["bench", "--emb-dim", "60", "--n-heads", "7"],
                    "--emb-dim (60) must be divisible by --n-heads (7)")


def test_version(capsys):
    from gpt2.cli.flags import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"python -m gpt2 {version()}"
