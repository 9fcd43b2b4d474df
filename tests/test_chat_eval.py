"""`chat` and `eval`, and `generate`'s streaming CLI: on tiny character-level checkpoints.

chat: a checkpoint whose tokenizer.json names a prompt template (alpaca) is prompted with the
conversation so far; any other continues each line on its own; /quit or end of input ends it.
eval: loss, perplexity and bits per byte, checked against a direct computation, for a text
file and for a prepared dataset's split.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gpt2_helpers import python_for, tiny_model

import minigrad as mg
from gpt2 import chat as chat_mod
from gpt2.chat import ALPACA, Chat, template_of_checkpoint
from gpt2.checkpoint import load_model, save_checkpoint
from gpt2.cli import main
from gpt2.dataset import PreparedDataset
from gpt2.generate import generate
from gpt2.perplexity import evaluate_dataset, evaluate_text
from gpt2.prepare import prepare
from gpt2.tokenizer import CharTokenizer

REPO = Path(__file__).resolve().parent.parent
TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles.\n") * 3
CHARS = CharTokenizer.from_text(TEXT + ALPACA.preamble + ALPACA.turn + "#?!0123456789 Paris. Capital of "
                                "France")


def _checkpoint(path: Path, template: str | None = None, context_length: int = 16) -> Path:
    model = tiny_model(seed=1, vocab_size=CHARS.vocab_size, context_length=context_length)
    save_checkpoint(path, model, tokenizer=CHARS)
    if template is not None:
        record = json.loads((path / "tokenizer.json").read_text())
        (path / "tokenizer.json").write_text(json.dumps({**record, "prompt_template": template}))
    return path


def _run_cli(capsys, monkeypatch, argv, stdin: str = ""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# generate: streaming, --prompt-file, standard input, --num-samples
# ---------------------------------------------------------------------------------------------

def test_generate_prints_what_generate_makes_from_every_prompt_source(tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path / "ckpt")
    model = load_model(ckpt)
    expected = CHARS.decode(generate(model, np.array(CHARS.encode("To be")), 30))
    (tmp_path / "prompt.txt").write_text("To be")
    base = ["generate", "--checkpoint", str(ckpt), "--max-new-tokens", "30"]
    for extra, stdin in ((["--prompt", "To be"], ""), (["--prompt-file", str(tmp_path / "prompt.txt")], ""),
                         (["--prompt-file", "-"], "To be"), ([], "To be")):
        code, out, err = _run_cli(capsys, monkeypatch, [*base, *extra], stdin)
        assert code == 0, err
        assert out == expected + "\n", extra


def test_num_samples_are_seeded_one_after_another(tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path / "ckpt")
    model = load_model(ckpt)
    code, out, err = _run_cli(capsys, monkeypatch, ["generate", "--checkpoint", str(ckpt), "--prompt", "Or",
                                                    "--max-new-tokens", "12", "--temperature", "1.0",
                                                    "--seed", "7", "--num-samples", "3"])
    assert code == 0, err
    want = "".join(f"--- sample {i + 1} of 3 ---\n" + CHARS.decode(
        generate(model, np.array(CHARS.encode("Or")), 12, temperature=1.0, seed=7 + i)) + "\n"
        for i in range(3))
    assert out == want


@pytest.mark.parametrize("argv, fragment", [
    (["--prompt-file", "nope.txt"], "--prompt-file nope.txt does not exist"),
    (["--prompt", "x", "--num-samples", "0"], "--num-samples"),
    (["--prompt", "\u00e9t\u00e9"], "outside this"),
    (["--prompt-file", "-"], "is empty"),
])
def test_generate_prompt_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, fragment):
    ckpt = _checkpoint(tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    code, out, err = _run_cli(capsys, monkeypatch, ["generate", "--checkpoint", str(ckpt), *argv])
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert fragment in err, err


# ---------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------

def test_chat_without_a_template_continues_each_line_on_its_own(tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path / "ckpt")
    assert template_of_checkpoint(ckpt) is None
    model = load_model(ckpt)
    answer = CHARS.decode(generate(model, np.array(CHARS.encode("To be")), 20)[len("To be"):])
    code, out, err = _run_cli(capsys, monkeypatch,
                              ["chat", "--checkpoint", str(ckpt), "--max-new-tokens", "20"],
                              "To be\n\nTo be\n/quit\nnever read\n")
    assert code == 0, err
    assert out == f"{answer}\n{answer}\n"          # the same line twice: the same answer (no memory)
    assert "no prompt template" in err


def test_chat_with_the_alpaca_template_sees_the_conversation(tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path / "ckpt", template="alpaca", context_length=512)
    assert template_of_checkpoint(ckpt) is ALPACA
    model = load_model(ckpt)
    chat = Chat(model, CHARS, ALPACA, max_new_tokens=15)
    first = "".join(chat.reply("To be?"))
    second = "".join(chat.reply("Or not?"))
    assert chat.prompt("x") == (ALPACA.preamble + "### Instruction:\nTo be?\n\n### Response:\n"
                                + first.strip()
                                + "\n\n### Instruction:\nOr not?\n\n### Response:\n" + second.strip()
                                + "\n\n### Instruction:\nx\n\n### Response:\n")
    # the CLI, from end of input (no /quit): the same answers
    code, out, err = _run_cli(capsys, monkeypatch,
                              ["chat", "--checkpoint", str(ckpt), "--max-new-tokens", "15"],
                              "To be?\nOr not?\n")
    assert code == 0, err
    assert out == f"{first}\n{second}\n" and "alpaca prompt template" in err


def test_an_answer_ends_where_the_model_starts_the_next_turn(monkeypatch):
    """The stop text ("\\n### ") ends an answer, and a piece that might be its start is held back."""
    text = "Paris.\n### Instruction:\nmore"
    ids = CHARS.encode(text)
    monkeypatch.setattr(chat_mod, "generate_stream", lambda *a, **k: iter(ids))
    model = tiny_model(vocab_size=CHARS.vocab_size, context_length=512)
    chat = Chat(model, CHARS, ALPACA, max_new_tokens=len(ids))
    pieces = list(chat.reply("Capital of France?"))
    assert "".join(pieces) == "Paris." and all("#" not in p for p in pieces)
    assert chat.history == [("Capital of France?", "Paris.")]


def test_an_unknown_template_is_one_line(tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path / "ckpt", template="vicuna-9")
    code, out, err = _run_cli(capsys, monkeypatch, ["chat", "--checkpoint", str(ckpt)], "hi\n")
    assert code == 2 and "'vicuna-9'" in err and "tokenizer.json" in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------

def _direct_nats(model, ids: np.ndarray) -> float:
    """Sum of -ln p(ids[i] | its window's earlier tokens), one token at a time."""
    T = model.config.context_length
    model.eval()
    total = 0.0
    with mg.no_grad():
        for i in range(1, len(ids)):
            start = (i - 1) // T * T
            logits = mg.to_numpy(model(ids[None, start:i]).data)[0, -1].astype(np.float64)
            m = logits.max()
            total += m + math.log(np.exp(logits - m).sum()) - logits[ids[i]]
    return total


def test_eval_numbers_match_a_direct_computation(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    model = load_model(ckpt)
    ids = np.array(CHARS.encode(TEXT))
    res = evaluate_text(model, CHARS, TEXT, batch_size=3)
    nats = _direct_nats(model, ids)
    assert res.tokens == len(ids) - 1 and res.bytes == len(TEXT[1:].encode("utf-8"))
    assert res.nats == pytest.approx(nats, rel=1e-6)
    assert res.loss == res.nats / res.tokens
    assert res.perplexity == math.exp(res.loss)
    assert res.bits_per_byte == res.nats / (math.log(2) * res.bytes)


def test_eval_cli_on_a_text_file_and_a_prepared_dataset(tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path / "ckpt")
    model = load_model(ckpt)
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT + ALPACA.preamble, encoding="utf-8")
    code, out, err = _run_cli(capsys, monkeypatch,
                              ["eval", "--checkpoint", str(ckpt), "--data", str(text_file),
                                                    "--json"])
    assert code == 0, err
    got = json.loads(out)
    want = evaluate_text(model, CHARS, text_file.read_text())
    assert (got["tokens"], got["bytes"], got["loss"], got["bits_per_byte"]) == \
        (want.tokens, want.bytes, want.loss, want.bits_per_byte)

    # a dataset prepared with the model's vocabulary: its val split by default, --split train too
    ds = tmp_path / "ds"
    prepare([text_file], ds, tokenizer="char", progress=False)
    manifest = json.loads((ds / "manifest.json").read_text())
    manifest["tokenizer"]["chars"], manifest["vocab_size"] = CHARS.chars, CHARS.vocab_size
    (ds / "manifest.json").write_text(json.dumps(manifest))   # the same text, the checkpoint's ids
    for shard in ds.glob("*.bin"):
        ids = np.array(CHARS.encode(text_file.read_text()), dtype=np.uint16)
        n_train = manifest["splits"]["train"]["tokens"]
        (ids[:n_train] if shard.name.startswith("train") else ids[n_train:]).tofile(shard)
    for split in ("val", "train"):
        code, out, err = _run_cli(capsys, monkeypatch, ["eval", "--checkpoint", str(ckpt), "--data", str(ds),
                                                        "--split", split])
        assert code == 0, err
        res = evaluate_dataset(model, PreparedDataset(ds), split)
        direct = _direct_nats(model, np.asarray(PreparedDataset(ds).shards[split][0]).astype(np.int64))
        assert res.nats == pytest.approx(direct, rel=1e-6)
        assert f"({split} split): {res.tokens:,} tokens (char tokenizer)" in out
        assert f"loss {res.loss:.4f} nats/token, perplexity {res.perplexity:.2f}, " \
               f"{res.bits_per_byte:.4f} bits per byte" in out


def test_eval_errors_are_one_line(tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path / "ckpt")
    text_file = tmp_path / "text.txt"
    text_file.write_text("xyz" * 30)
    other = tmp_path / "other"
    prepare([text_file], other, tokenizer="char", progress=False)
    for argv, fragment in ((["--data", str(tmp_path / "nope")], "does not exist"),
                           (["--data", str(text_file), "--split", "train"], "--split applies to a prepared"),
                           (["--data", str(other)], "prepared with the char tokenizer (vocabulary 3)"),
                           (["--data", str(text_file)], "outside this"),
                           (["--data", str(tmp_path)], "not a prepared dataset"),
                           (["--data", str(text_file), "--batch-size", "0"], "--batch-size")):
        code, out, err = _run_cli(capsys, monkeypatch, ["eval", "--checkpoint", str(ckpt), *argv])
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), (argv, err)
        assert fragment in err, (fragment, err)


# ---------------------------------------------------------------------------------------------
# the new commands on CuPy (a real GPU, or the stand-in) in a real process, chosen by MINIGRAD_BACKEND
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_streaming_generate_chat_and_eval_on_cupy(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MINIGRAD_BACKEND": "cupy"}

    def run(*argv, stdin=""):
        res = subprocess.run([*python_for("cupy"), "-m", "gpt2", *argv], cwd=REPO, capture_output=True,
                             text=True, timeout=300, env=env, input=stdin)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout

    model = load_model(ckpt)
    expected = CHARS.decode(generate(model, np.array(CHARS.encode("To be")), 10))
    assert run("generate", "--checkpoint", str(ckpt), "--prompt", "To be", "--max-new-tokens", "10") == \
        expected + "\n"
    assert run("chat", "--checkpoint", str(ckpt), "--max-new-tokens", "10", stdin="To be\n") == \
        expected[len("To be"):] + "\n"
    got = json.loads(run("eval", "--checkpoint", str(ckpt), "--data", str(text_file), "--json"))
    assert got["loss"] == pytest.approx(evaluate_text(model, CHARS, TEXT).loss, rel=1e-4)
