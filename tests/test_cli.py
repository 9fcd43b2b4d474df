"""The command line (gpt2/cli/main.py): help, train + generate end to end, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from gpt2_helpers import tiny_model, tokenizer_or_skip

from gpt2.checkpoint import load_model, save_checkpoint
from gpt2.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
TINY = ["--n-layers", "1", "--n-heads", "2", "--emb-dim", "16", "--context-length", "32"]


@pytest.fixture
def story(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("I HAD always thought Jack Gisburn rather a cheap genius--though a good fellow "
                    "enough--so it was no great surprise to me to hear that, in the height of his "
                    "glory, he had dropped his painting, married a rich widow, and established himself "
                    "in a villa on the Riviera. " * 6, encoding="utf-8")
    return path


def _error_line(capsys, code, argv, *fragments):
    """main(argv) exits with `code`, printing exactly one stderr line `error: ...` with the fragments."""
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# help
# ---------------------------------------------------------------------------------------------

TRAIN_FLAGS = ["--data", "--model", "--context-length", "--n-layers", "--n-heads", "--emb-dim", "--dropout",
               "--qkv-bias", "--no-qkv-bias", "--tie-embeddings", "--no-tie-embeddings", "--epochs",
               "--max-steps", "--batch-size", "--lr", "--weight-decay", "--eval-every", "--seed", "--backend",
               "--out", "--eval-iter", "--grad-clip", "--warmup-steps", "--sample-prompt", "--overwrite",
               "--init"]
GENERATE_FLAGS = ["--checkpoint", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p",
                  "--seed", "--backend", "--pretrained", "--cache-dir", "--no-cache"]


@pytest.mark.parametrize("command, flags", [("train", TRAIN_FLAGS), ("generate", GENERATE_FLAGS)])
def test_help_documents_every_flag(capsys, command, flags):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    for flag in flags:
        assert flag in out, flag
    assert main(["--help"]) == 0
    assert command in capsys.readouterr().out


def test_train_defaults_are_the_course_run():
    args = build_parser().parse_args(["train"])
    assert (args.model, args.context_length, args.dropout, args.qkv_bias, args.tie_embeddings) == \
        ("gpt2-124m", 256, 0.1, False, False)
    assert (args.lr, args.weight_decay, args.batch_size, args.epochs, args.seed, args.eval_every) == \
        (4e-4, 0.1, 2, 10, 123, 5)
    assert args.init == "book"   # PyTorch's layer defaults, as the book's model starts from


def test_python_dash_m_gpt2_runs():
    result = subprocess.run([sys.executable, "-m", "gpt2", "generate", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--top-p" in result.stdout


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------


def test_train_then_generate(tmp_path, story, capsys):
    tokenizer_or_skip()
    out = tmp_path / "run"
    argv = ["train", "--data", str(story), *TINY, "--epochs", "2", "--batch-size", "2", "--eval-every", "2",
            "--eval-iter", "2", "--lr", "1e-3", "--out", str(out), "--no-progress", "--grad-clip", "1.0"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "Ep 1 (Step 000000): Train loss" in stdout and "Ep 2 (Step" in stdout
    assert stdout.count("Every effort moves you") == 2                       # a sample per epoch
    final = [line for line in stdout.splitlines() if line.startswith("final:")]
    evals = re.findall(r"Step (\d{6})\): Train loss ([\d.]+), Val loss ([\d.]+)", stdout)
    steps = int((out / "latest").read_text().strip().split("-")[1])
    # The final line names the step of the evaluation it reports, not only the steps run.
    assert len(final) == 1 and final[0].startswith(f"final: {steps} steps,")
    assert final[0].endswith(f"last evaluation (Step {evals[-1][0]}): train loss {evals[-1][1]}, "
                             f"val loss {evals[-1][2]}")
    # A run directory: ckpt-<step>/ (one checkpoint directory per save), `latest` naming the newest.
    ckpt = out / (out / "latest").read_text().strip()
    assert sorted(p.name for p in out.iterdir()) == [ckpt.name, "latest", "loss.png"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors",
                                                      "optimizer.safetensors", "tokenizer.json",
                                                      "trainer_state.json"]
    assert json.loads((ckpt / "tokenizer.json").read_text()) == {"type": "gpt2"}   # generate decodes with it
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["epoch"] == 2 and state["run"]["lr"] == 1e-3 and state["history"]["train_losses"]
    model = load_model(out)
    assert (model.config.n_layers, model.config.emb_dim, model.config.context_length) == (1, 16, 32)

    gen = ["generate", "--checkpoint", str(out), "--prompt", "Jack Gisburn", "--max-new-tokens", "8"]
    assert main(gen) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("Jack Gisburn")
    assert main([*gen, "--no-cache"]) == 0
    assert capsys.readouterr().out == greedy                                 # KV cache changes nothing
    sampled = ["generate", "--checkpoint", str(out), "--prompt", "Jack", "--temperature", "1.2",
               "--top-k", "20", "--top-p", "0.95", "--seed", "5", "--max-new-tokens", "8"]
    assert main(sampled) == 0
    first = capsys.readouterr().out
    assert main(sampled) == 0
    assert capsys.readouterr().out == first                                  # the seed reproduces

    # The same --out again: refused with the fix, before any training; --overwrite allows it.
    _error_line(capsys, 2, argv, "already holds a checkpoint", "--overwrite")
    assert main([*argv, "--overwrite", "--max-steps", "1", "--eval-every", "1", "--sample-prompt", ""]) == 0
    assert "Ep 1 (Step 000000)" in capsys.readouterr().out


def test_generate_pretrained_calls_load_pretrained_lazily(tmp_path, monkeypatch, capsys):
    tokenizer_or_skip()
    import gpt2.pretrained

    calls = []

    def fake_load_pretrained(name_or_dir, backend=None, dtype="float32", cache_dir=None):
        calls.append((name_or_dir, backend, cache_dir))
        return tiny_model(vocab_size=50257, context_length=32)

    monkeypatch.setattr(gpt2.pretrained, "load_pretrained", fake_load_pretrained)
    assert main(["generate", "--pretrained", "gpt2", "--cache-dir", str(tmp_path), "--prompt", "Hello",
                 "--max-new-tokens", "3"]) == 0
    assert calls == [("gpt2", "numpy", str(tmp_path))]
    assert capsys.readouterr().out.startswith("Hello")


# ---------------------------------------------------------------------------------------------
# errors: one line, exit code 2, no traceback
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, fragments", [
    (["--lr", "-0.1"], ["--lr"]),
    (["--lr", "nan"], ["--lr"]),
    (["--weight-decay", "-1"], ["--weight-decay"]),
    (["--batch-size", "0"], ["--batch-size", "positive"]),
    (["--epochs", "-2"], ["--epochs"]),
    (["--context-length", "2048"], ["--context-length 2048", "1024"]),
    (["--context-length", "0"], ["--context-length"]),
    (["--n-heads", "5"], ["divisible"]),
    (["--dropout", "1.5"], ["--dropout"]),
    (["--grad-clip", "0"], ["--grad-clip"]),
    (["--eval-every", "0"], ["--eval-every"]),
    (["--max-steps", "0"], ["--max-steps"]),
])
def test_train_bad_values(tmp_path, story, capsys, extra, fragments):
    _error_line(capsys, 2, ["train", "--data", str(story), "--out", str(tmp_path / "o"), *extra], *fragments)
    assert not (tmp_path / "o").exists()


def test_train_bad_data_files(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    _error_line(capsys, 2, ["train", "--data", str(tmp_path / "missing.txt"), *out], "does not exist")
    (tmp_path / "empty.txt").write_text("")
    _error_line(capsys, 2, ["train", "--data", str(tmp_path / "empty.txt"), *out], "empty")
    (tmp_path / "bin.dat").write_bytes(bytes(range(256)))
    _error_line(capsys, 2, ["train", "--data", str(tmp_path / "bin.dat"), *out], "binary")
    tokenizer_or_skip()
    (tmp_path / "short.txt").write_text("Far too short for a window of 32 tokens.")
    _error_line(capsys, 2, ["train", "--data", str(tmp_path / "short.txt"), *TINY, *out], "too few")


def test_generate_bad_values(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, tiny_model(vocab_size=50257))
    base = ["generate", "--checkpoint", str(ckpt), "--prompt", "Hi"]
    _error_line(capsys, 2, [*base, "--temperature", "-0.5"], "--temperature")
    _error_line(capsys, 2, [*base, "--top-p", "0"], "--top-p", "(0, 1]")
    _error_line(capsys, 2, [*base, "--top-p", "1.5"], "--top-p")
    _error_line(capsys, 2, [*base, "--top-k", "0"], "--top-k")
    _error_line(capsys, 2, [*base, "--max-new-tokens", "0"], "--max-new-tokens")
    _error_line(capsys, 2, [*base, "--cache-dir", str(tmp_path)], "--cache-dir")
    _error_line(capsys, 2, ["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "Hi"],
                "does not exist")
    _error_line(capsys, 2, ["generate", "--checkpoint", str(tmp_path), "--prompt", "Hi"], "not a checkpoint")


def test_argparse_errors_exit_2(capsys):
    for argv in (["train", "--model", "gpt5"], ["train", "--backend", "tpu"], ["train", "--lr", "fast"],
                 ["generate", "--prompt", "x"],                                       # no model given
                 ["generate", "--checkpoint", "a", "--pretrained", "gpt2", "--prompt", "x"], ["fly"], []):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err


def test_cupy_missing_is_one_line(tmp_path, story, capsys, cupy_unusable):
    _error_line(capsys, 2, ["train", "--data", str(story), "--backend", "cupy", "--out", str(tmp_path / "o")],
                "cupy")


def test_errors_in_a_real_process_have_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "gpt2", "generate", "--checkpoint", str(tmp_path / "x"),
                             "--prompt", "hi"], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr


def test_every_command_in_the_readmes_parses():
    """Each `python -m gpt2 ...` line in README.md and benchmarks/README.md names flags that exist
    (after nanoGPT's spellings are read), so the docs cannot promise a flag the CLI refuses."""
    import re
    import shlex

    from gpt2.cli.main import build_parser, normalize_argv

    repo = Path(__file__).resolve().parent.parent
    seen = 0
    for doc in (repo / "README.md", repo / "benchmarks" / "README.md"):
        text = doc.read_text(encoding="utf-8").replace("\\\n", " ")
        for line in text.splitlines():
            m = re.search(r"(?:^|[\s|])python -m gpt2 (.*)$", line)
            shown = "$ python" in line or "error:" in line    # a mistake and its message, shown as such
            if m is None or "..." in m.group(1) or "`" in line or shown:   # (`: prose, not a code block)
                continue
            command = re.split(r"\s{3,}|\s{2}#|\s#\s", m.group(1))[0]   # (a comment or description)
            argv = [a for a in shlex.split(command) if not a.startswith("[")]   # [optional] in a synopsis
            if not argv or argv[0].isupper() or argv[0].startswith("-"):   # COMMAND --help, --version
                continue
            parser = build_parser()
            try:
                args, extras = parser.parse_known_args(normalize_argv(parser, argv))
            except SystemExit as exc:
                raise AssertionError(f"{doc.name}: `python -m gpt2 {command}` does not parse") from exc
            assert not extras, f"{doc.name}: `python -m gpt2 {command}`: unknown {extras}"
            seen += 1
    assert seen > 30


def test_train_on_a_prepared_dataset_labels_and_samples_what_it_trains(tmp_path, capsys):
    """A custom shape is not called gpt2-124m's; the default sample prompt of a prepared dataset is
    its own first line, not The Verdict's "Every effort moves you"."""
    text = tmp_path / "play.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40)
    assert main(["prepare", str(text), "--tokenizer", "char", "--out", str(tmp_path / "ds"),
                 "--no-progress"]) == 0
    assert main(["train", "--data", str(tmp_path / "ds"), "--n-layers", "1", "--n-heads", "2", "--emb-dim",
                 "16", "--context-length", "16", "--max-steps", "2", "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "model: custom shape, 1 layers" in out and "gpt2-124m" not in out
    assert "\nFirst Citizen:" in out and "Every effort" not in out


def test_train_on_a_text_file_counts_its_tokens_once(tmp_path, capsys):
    tok = tokenizer_or_skip()
    text = "It had always been a cheap genius, though a good fellow enough. " * 30
    (tmp_path / "story.txt").write_text(text)
    assert main(["train", "--data", str(tmp_path / "story.txt"), "--n-layers", "1", "--n-heads", "2",
                 "--emb-dim", "16", "--context-length", "16", "--max-steps", "1",
                 "--out", str(tmp_path / "run"),
                 "--no-progress", "--sample-prompt", ""]) == 0
    out = capsys.readouterr().out
    n_tokens = len(tok.encode(text))
    assert f"{len(text):,} characters, {n_tokens:,} tokens; split 90/10 by characters: train " in out
