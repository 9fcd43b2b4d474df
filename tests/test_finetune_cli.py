"""`python -m gpt2 finetune classify|instruct|dpo` end to end, on tiny models with GPT-2's vocabulary
and the book's data: accuracy, falling losses, responses and the prompt template, DPO's log 2 and
reward margin, exact resume (LoRA and DPO's reference included), the CuPy half, and one-line
errors.

The data and the vocabulary are found offline through $GPT2_DATA_MIRROR and $TIKTOKEN_CACHE_DIR
(tests/conftest.py points them at the CI folder's copies); where either is missing these tests
skip, saying which.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from gpt2_helpers import tokenizer_or_skip

import minigrad as mg
from gpt2 import GPT2Error, GPTConfig, GPTModel
from gpt2.checkpoint import load_checkpoint, load_model, read_trainer_state, save_checkpoint
from gpt2.cli import main
from gpt2.finetune import FINETUNE_FILES, finetune_file, format_input
from gpt2.tokenizer import get_tokenizer
from minigrad import no_grad

QUIET = ["--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The book's three data files (copied from the mirror), or skip."""
    folder = tmp_path_factory.mktemp("finetune-data")
    paths = {}
    for name in FINETUNE_FILES:
        try:
            paths[name] = str(finetune_file(name, data_dir=folder, download=False))
        except GPT2Error as exc:
            pytest.skip(f"{FINETUNE_FILES[name].title} not available offline: {exc}")
    return paths


def _base(path, seed=0, emb_dim=32, n_layers=2, context=128, init_scale=None):
    """A tiny GPT with GPT-2's vocabulary (tied head), saved as a checkpoint of ours."""
    tokenizer_or_skip()
    mg.manual_seed(seed)
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=context, emb_dim=emb_dim, n_heads=2,
                               n_layers=n_layers, dropout=0.0, qkv_bias=True, tie_embeddings=True))
    save_checkpoint(path, model, tokenizer=get_tokenizer())
    return str(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _base(tmp_path_factory.mktemp("base") / "tiny")


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured.out


def _history(run_dir):
    return read_trainer_state(run_dir)["history"]


def _error(capsys, argv, *fragments):
    """main(argv) exits 2 printing one stderr line, `error: ...`, with the fragments."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ---------------------------------------------------------------------------------------------
# classify
# ---------------------------------------------------------------------------------------------

def test_classify_reaches_95_percent_test_accuracy(tmp_path, base, data, capsys):
    """Offline, without pretrained weights: a 2-layer, 32-wide GPT with GPT-2's vocabulary (1.6M
    parameters, GPT-2's random init, seed 0), trained whole for one epoch (130 steps of 8) at
    lr 1e-3, classifies the 300 test messages. Measured: 96.67% (seeds 1-3 of the model: 96.00,
    96.00, 96.67%)."""
    out = _run(["finetune", "classify", "--checkpoint", base, "--data", data["sms_spam"], "--trainable",
                "all", "--lr", "1e-3", "--epochs", "1", "--eval-every", "50", "--out", str(tmp_path / "cls"),
                *QUIET], capsys)
    results = json.loads((tmp_path / "cls" / "results.json").read_text())
    assert results["task"] == "classify" and results["steps"] == 130
    assert results["test"]["examples"] == 300 and results["val"]["examples"] == 149
    assert results["train"]["examples"] == 1040
    assert results["test"]["accuracy"] >= 0.95, results
    assert out.count("Training accuracy: ") == 2                  # after the epoch, and at the end
    assert f"Test accuracy: {100 * results['test']['accuracy']:.2f}%" in out
    assert (tmp_path / "cls" / "accuracy.png").stat().st_size > 0
    assert (tmp_path / "cls" / "loss.png").is_file()
    model = load_model(tmp_path / "cls")                          # a classifier, rebuilt from config.json
    assert model.config.num_classes == 2 and model.head.bias is not None


def test_classify_the_books_freezing_and_lora(tmp_path, base, data, capsys):
    """The defaults train the last block, the final norm and the new head; --lora-rank trains only
    LoRA's updates and the head; both learn, and the LoRA checkpoint reloads unmerged."""
    common = ["--data", data["sms_spam"], "--max-steps", "12", "--eval-every", "4", "--eval-iter", "3",
              "--lr", "3e-3", "--max-length", "24", *QUIET]
    out = _run(["finetune", "classify", "--checkpoint", base, "--out", str(tmp_path / "last"), *common],
               capsys)
    assert "(the last block, the final norm and the head)" in out
    out = _run(["finetune", "classify", "--checkpoint", base, "--lora-rank", "4", "--lora-alpha", "8",
                "--out", str(tmp_path / "lora"), *common], capsys)
    assert "LoRA rank 4, alpha 8 on attn.qkv, attn.proj, mlp.fc, mlp.proj and the new classifier head" in out
    for run in ("last", "lora"):
        h = _history(tmp_path / run)
        assert h["train_losses"][-1] < h["train_losses"][0], (run, h["train_losses"])
    ckpt = load_checkpoint(tmp_path / "lora")
    assert ckpt.config.lora_rank == 4 and ckpt.config.lora_alpha == 8.0 and ckpt.config.num_classes == 2
    base_model = load_model(base)
    frozen = {n: mg.to_numpy(p.data) for n, p in base_model.named_parameters()}
    for name, value in ckpt.model.state_dict().items():   # every pretrained weight untouched
        if name in frozen:
            np.testing.assert_array_equal(mg.to_numpy(value), frozen[name], err_msg=name)


# ---------------------------------------------------------------------------------------------
# instruct
# ---------------------------------------------------------------------------------------------

def test_instruct_learns_writes_responses_and_records_the_template(tmp_path, base, data, capsys):
    run = tmp_path / "sft"
    out = _run(["finetune", "instruct", "--checkpoint", base, "--data", data["instructions"], "--max-steps",
                "8", "--eval-every", "1", "--eval-iter", "1", "--batch-size", "4", "--max-length", "48",
                "--lr", "5e-3", "--responses", "3", "--max-new-tokens", "6", "--out", str(run), *QUIET],
               capsys)
    h = _history(run)              # from about ln 50257 = 10.8 (a random model), falling at every step
    assert len(h["train_losses"]) == 8 and h["train_losses"][0] > 10.0
    assert all(b < a for a, b in zip(h["train_losses"], h["train_losses"][1:]))
    assert h["train_losses"][-1] < h["train_losses"][0] - 1.0
    assert h["val_losses"][-1] < h["val_losses"][0] - 1.0
    assert "935 / 55 / 110 entries" in out and "cut to 48 tokens, prompt not masked" in out
    responses = json.loads((run / "instruction-data-with-response.json").read_text())
    test = json.loads(open(data["instructions"]).read())[935:1045]
    assert len(responses) == 3
    assert [r["instruction"] for r in responses] == [t["instruction"] for t in test[:3]]
    assert all(set(r) == {"instruction", "input", "output", "model_response"} for r in responses)
    record = json.loads((_latest(run) / "tokenizer.json").read_text())
    assert record == {"type": "gpt2", "prompt_template": "alpaca"}
    # generate answers in the template and prints only the answer; --raw continues the text
    model, tok = load_model(run), get_tokenizer()
    from gpt2.chat import ALPACA, Chat

    expected = "".join(Chat(model, tok, ALPACA, max_new_tokens=6).reply("Name a colour."))
    ask = ["generate", "--checkpoint", str(run), "--prompt", "Name a colour.", "--max-new-tokens", "6"]
    assert main(ask) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert Chat(model, tok, ALPACA).prompt("Name a colour.") == format_input(
        {"instruction": "Name a colour.", "input": ""}) + "\n\n### Response:\n"
    assert main(["generate", "--checkpoint", str(run), "--prompt", "Name a colour.", "--max-new-tokens", "3",
                 "--raw"]) == 0
    assert capsys.readouterr().out.startswith("Name a colour.")
    assert responses[0]["model_response"] == _response(model, tok, test[0], 6)


def _latest(run_dir):
    return run_dir / (run_dir / "latest").read_text().strip()


def _response(model, tok, entry, n):
    from gpt2.finetune import generate_response

    return generate_response(model, tok, entry, n)


def test_instruct_from_pretrained_weights_then_chat_in_the_template(tmp_path, data, capsys, monkeypatch):
    """--pretrained takes a Hugging Face-layout directory as well as a name (here our tiny model,
    exported); chat reads the template the fine-tuned checkpoint records."""
    import io

    from gpt2.pretrained import export_hf

    export_hf(load_model(_base(tmp_path / "ours", emb_dim=16, n_layers=1)), tmp_path / "hf")
    run = tmp_path / "sft"
    out = _run(["finetune", "instruct", "--pretrained", str(tmp_path / "hf"), "--data", data["instructions"],
                "--max-steps", "2", "--eval-every", "1", "--eval-iter", "1", "--batch-size", "2",
                "--max-length", "32", "--responses", "0", "--out", str(run), *QUIET], capsys)
    assert f"model: pretrained {tmp_path / 'hf'}, 1 layers" in out
    monkeypatch.setattr("sys.stdin", io.StringIO("Name a colour.\n/quit\n"))
    assert main(["chat", "--checkpoint", str(run), "--max-new-tokens", "3"]) == 0
    assert "alpaca prompt template" in capsys.readouterr().err


def test_instruct_masks_the_prompt_when_asked(tmp_path, base, data, capsys):
    out = _run(["finetune", "instruct", "--checkpoint", base, "--data", data["instructions"], "--max-steps",
                "1", "--eval-every", "1", "--eval-iter", "1", "--batch-size", "2", "--max-length", "48",
                "--mask-prompt", "--responses", "0", "--out", str(tmp_path / "m"), *QUIET], capsys)
    assert "prompt masked" in out and not (tmp_path / "m" / "instruction-data-with-response.json").exists()


# ---------------------------------------------------------------------------------------------
# dpo
# ---------------------------------------------------------------------------------------------

def test_dpo_starts_at_log_2_and_raises_the_reward_margin(tmp_path, base, data, capsys):
    """Policy and reference start equal: the DPO loss of any batch is log 2 and every reward 0.
    Training then lowers the loss and raises the margin of the chosen over the rejected answers:
    3 epochs over the first 12 preference pairs (10 train, 1 val, 1 test), evaluated on every
    training batch after each epoch's first step."""
    from gpt2.finetune import DPOTask, frozen_copy

    subset = tmp_path / "pairs.json"
    subset.write_text(json.dumps(json.loads(open(data["preferences"]).read())[:12]))
    model = load_model(base)
    task = DPOTask(model, get_tokenizer(), frozen_copy(model), path=subset, batch_size=2)
    ids, mask = next(iter(task.train_loader.batches()))
    assert ids.shape[0] == 4 and mask.dtype == bool
    with no_grad():
        assert task.loss_fn(ids, mask, model).item() == pytest.approx(math.log(2), abs=1e-6)
        assert task.objective.measure(model, task.train_loader)["reward_margin"] == 0.0
    run = tmp_path / "dpo"
    out = _run(["finetune", "dpo", "--checkpoint", base, "--data", str(subset), "--epochs", "3",
                "--eval-every", "5", "--eval-iter", "5", "--batch-size", "2", "--beta", "0.5", "--lr", "3e-3",
                "--out", str(run), *QUIET], capsys)
    h = _history(run)
    assert h["steps"] == [0, 5, 10] and abs(h["val_losses"][0] - math.log(2)) < 0.03
    assert h["train_losses"][0] < math.log(2)                     # (after the first step)
    assert all(b < a for a, b in zip(h["train_losses"], h["train_losses"][1:]))
    assert h["train_losses"][-1] < math.log(2) - 0.05
    margins = [m["train_reward_margin"] for m in h["metrics"]]
    assert all(b > a for a, b in zip(margins, margins[1:])) and margins[-1] > 0.2, margins
    wanted = {"val_reward_margin", "val_chosen_reward", "val_rejected_reward", "train_chosen_reward"}
    assert all(wanted <= set(m) for m in h["metrics"])
    assert "Train reward margin" in out and "(chosen " in out and "rejected " in out
    assert "beta 0.5" in out and "lr 0.003" in out and "10 / 1 / 1 preference pairs" in out
    assert (run / "rewards.png").is_file()
    assert json.loads((_latest(run) / "tokenizer.json").read_text())["prompt_template"] == "alpaca"


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------

RESUMABLE = [
    # unmerged LoRA, and dropout's generator; DPO's reference rebuilt from the source
    ("classify", ["--lora-rank", "4", "--dropout", "0.1", "--max-length", "40"], "sms_spam"),
    ("dpo", ["--batch-size", "2", "--max-length", "96"], "preferences"),
    ("instruct", ["--batch-size", "2", "--max-length", "48"], "instructions"),
]


@pytest.mark.parametrize("task, extra, file", RESUMABLE, ids=[r[0] for r in RESUMABLE])
def test_resume_continues_exactly(tmp_path, base, data, capsys, task, extra, file):
    argv = ["finetune", task, "--checkpoint", base, "--data", data[file], "--eval-every", "1",
            "--eval-iter", "1", "--lr", "1e-3", "--responses", "0", *extra, *QUIET]
    if task == "classify":
        argv.remove("--responses")
        argv.remove("0")
    _run([*argv, "--max-steps", "6", "--out", str(tmp_path / "whole")], capsys)
    _run([*argv, "--max-steps", "3", "--out", str(tmp_path / "split")], capsys)
    out = _run(["finetune", task, "--resume", str(tmp_path / "split"), "--max-steps", "6", *QUIET], capsys)
    assert "resuming" in out and "changed: --max-steps 6 (was 3)" in out
    whole, split = _history(tmp_path / "whole"), _history(tmp_path / "split")
    assert split["train_losses"] == whole["train_losses"] and split["val_losses"] == whole["val_losses"]
    assert split["metrics"] == whole["metrics"] and len(whole["steps"]) == 6
    a, b = load_model(tmp_path / "whole").state_dict(), load_model(tmp_path / "split").state_dict()
    for name in a:
        np.testing.assert_array_equal(mg.to_numpy(a[name]), mg.to_numpy(b[name]), err_msg=name)


# ---------------------------------------------------------------------------------------------
# The CuPy half (on the CPU stand-in where there is no GPU)
# ---------------------------------------------------------------------------------------------

CUPY_RUNS = [("classify", "sms_spam", []), ("instruct", "instructions", ["--responses", "1"]),
             ("dpo", "preferences", [])]


@pytest.mark.parametrize("task, file, extra", CUPY_RUNS, ids=[r[0] for r in CUPY_RUNS])
def test_finetune_on_cupy(tmp_path, data, capsys, task, file, extra):
    small = _base(tmp_path / "small", emb_dim=16, n_layers=1)
    argv = ["finetune", task, "--checkpoint", small, "--data", data[file], "--max-steps", "2",
            "--eval-every", "1", "--eval-iter", "1", "--batch-size", "2", "--max-length", "32", *extra,
            "--backend", "cupy", "--out", str(tmp_path / "run"), *QUIET]
    if task != "classify":
        argv += ["--max-new-tokens", "2"]
    try:
        out = _run(argv, capsys)
    finally:
        mg.set_backend("numpy")
    assert "backend cupy" in out and "Ep 1 (Step 000001)" in out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 2
    assert math.isfinite(results["test"]["loss"] if task == "classify" else results["val_loss"])
    if task == "instruct":
        assert len(json.loads((tmp_path / "run" / "instruction-data-with-response.json").read_text())) == 1


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2
# ---------------------------------------------------------------------------------------------

def test_finetune_errors_are_one_line(tmp_path, base, data, capsys, monkeypatch):
    classifier = tmp_path / "clf"
    _run(["finetune", "classify", "--checkpoint", base, "--data", data["sms_spam"], "--max-steps", "1",
          "--eval-every", "1", "--eval-iter", "1", "--max-length", "16", "--out", str(classifier), *QUIET],
         capsys)
    _error(capsys, ["finetune", "summarise", "--checkpoint", base], "invalid choice", "classify")
    _error(capsys, ["finetune", "classify"], "--pretrained NAME_OR_DIR", "--checkpoint DIR")
    for task in ("instruct", "dpo"):
        _error(capsys, ["finetune", task, "--checkpoint", str(classifier), "--data",
                        data["instructions" if task == "instruct" else "preferences"]],
               "classifier", "language model")
    _error(capsys, ["finetune", "classify", "--checkpoint", base, "--lora-rank", "4", "--trainable", "all"],
           "--trainable does not apply with --lora-rank")
    _error(capsys, ["finetune", "classify", "--checkpoint", base, "--beta", "0.2"], "--beta applies to dpo")
    _error(capsys, ["finetune", "classify", "--checkpoint", base, "--lora-alpha", "8"], "need --lora-rank")
    _error(capsys, ["finetune", "classify", "--checkpoint", base, "--lr", "0"], "--lr must be > 0")
    _error(capsys, ["finetune", "classify", "--checkpoint", base, "--data", str(tmp_path / "nope.tsv")],
           "nope.tsv does not exist")
    _error(capsys, ["finetune", "classify", "--checkpoint", base, "--data", data["sms_spam"], "--out",
                    str(classifier)], "already holds a checkpoint", "--overwrite")
    _error(capsys, ["finetune", "dpo", "--resume", str(classifier)],
           "is a run of `python -m gpt2 finetune classify`")
    _error(capsys, ["finetune", "classify", "--checkpoint", base, "--data", data["sms_spam"], "--max-length",
                    "200"], "more than the model's context length 128")
    _error(capsys, ["generate", "--checkpoint", str(classifier), "--prompt", "hi"], "is a classifier")
    # the book's data file, offline and not in the data folder: where to get it, and --data
    monkeypatch.delenv("GPT2_DATA_MIRROR", raising=False)
    monkeypatch.setenv("GPT2_DATA_DIR", str(tmp_path / "empty"))
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    _error(capsys, ["finetune", "classify", "--checkpoint", base, "--out", str(tmp_path / "x")],
           "sms+spam+collection.zip", "--data FILE")


def test_a_train_run_is_not_resumed_by_finetune_nor_the_other_way(tmp_path, base, data, capsys):
    story = tmp_path / "story.txt"
    story.write_text("Every effort moves you closer to the end of the story, said Jack Gisburn. " * 30)
    _run(["train", "--data", str(story), "--n-layers", "1", "--n-heads", "2", "--emb-dim", "16",
          "--context-length", "16", "--max-steps", "1", "--eval-every", "1", "--eval-iter", "1",
          "--sample-prompt", "", "--out", str(tmp_path / "pre"), *QUIET], capsys)
    _error(capsys, ["finetune", "classify", "--resume", str(tmp_path / "pre")],
           "is a run of `python -m gpt2 train`")
    _run(["finetune", "classify", "--checkpoint", base, "--data", data["sms_spam"], "--max-steps", "1",
          "--eval-every", "1", "--eval-iter", "1", "--max-length", "16", "--out", str(tmp_path / "cls"),
          *QUIET], capsys)
    _error(capsys, ["train", "--resume", str(tmp_path / "cls")], "is a run of `python -m gpt2 finetune`",
           "finetune TASK --resume")


def test_help_lists_the_flags(capsys):
    assert main(["finetune", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--pretrained", "--checkpoint", "--resume", "--data", "--max-length", "--mask-prompt",
                 "--trainable", "--lora-rank", "--lora-alpha", "--lora-targets", "--epochs", "--max-steps",
                 "--batch-size", "--lr", "--weight-decay", "--eval-every", "--eval-iter", "--beta", "--seed",
                 "--backend", "--out", "--overwrite", "--responses", "--max-new-tokens", "--no-progress"):
        assert flag in out, flag
