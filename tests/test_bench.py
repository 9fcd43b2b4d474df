"""`gpt2.cli.bench`: the benchmark runs on a tiny model and reports sane numbers (no timing limits)."""

from __future__ import annotations

import argparse
import json

import pytest

from gpt2 import GPTConfig
from gpt2.cli import bench

TINY = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2, dropout=0.1,
                 qkv_bias=False, tie_embeddings=False)


def test_bench_result_has_every_figure():
    res = bench.bench(TINY, batch_size=2, steps=2, warmup=1, gen_tokens=4, gen_runs=1, matmul_size=64)
    for phase in ("forward", "backward", "optimizer", "step"):
        t = res["time_s"][phase]
        assert 0 < t["min"] <= t["median"] <= t["max"]
    assert len(res["step_times_s"]) == 2
    assert res["tokens_per_step"] == 2 * 16
    assert res["tokens_per_s"] > 0
    assert res["flops_per_step"] == bench.step_flops(TINY, 2)
    assert res["achieved_flops_per_s"] > 0 and res["matmul_flops_per_s"] > 0
    assert 0 < res["fraction_of_matmul_rate"]
    assert res["peak_rss_mib"] >= res["peak_rss_mib_after_init"] > 0
    assert res["params"] == TINY.num_parameters()
    assert res["first_loss"] > 0 and res["last_loss"] > 0
    g = res["generate"]
    assert g["new_tokens"] == 4
    assert g["cache"]["tokens_per_s"] > 0 and g["no_cache"]["tokens_per_s"] > 0
    assert g["same_tokens_cache_vs_no_cache"] is True


def test_step_flops_counts_matmuls():
    # 6 FLOPs per matmul weight per token, plus attention's two T x T products (x3 for backward)
    cfg = GPTConfig(vocab_size=10, context_length=4, emb_dim=8, n_heads=2, n_layers=1)
    weights = 12 * 8 * 8 + 10 * 8
    assert bench.step_flops(cfg, 3) == 6 * 12 * weights + 12 * 3 * 4 * 4 * 8


def _parse(argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_are_the_course_run():
    args = _parse([])
    cfg = bench.config_from_args(args)
    assert (cfg.n_layers, cfg.n_heads, cfg.emb_dim, cfg.vocab_size) == (12, 12, 768, 50257)
    assert (cfg.context_length, cfg.dropout, cfg.qkv_bias, cfg.tie_embeddings) == (256, 0.1, False, False)
    assert bench.settings_from_args(args)["batch_size"] == 2
    assert (args.backend, args.json, args.no_generate) == ("numpy", False, False)


def test_shakespeare_char_preset_and_overrides():
    # nanoGPT's CPU Shakespeare model; flags given beside the preset win
    cfg = bench.config_from_args(_parse(["--preset", "shakespeare-char"]))
    assert (cfg.vocab_size, cfg.n_layers, cfg.n_heads, cfg.emb_dim) == (65, 4, 4, 128)
    assert (cfg.context_length, cfg.dropout, cfg.qkv_bias, cfg.tie_embeddings) == (64, 0.0, False, True)
    assert bench.settings_from_args(_parse(["--preset", "shakespeare-char"]))["batch_size"] == 12
    args = _parse(["--preset", "shakespeare-char", "--batch-size", "3", "--no-tie-embeddings",
                   "--dropout", "0.2", "--vocab-size", "100", "--qkv-bias"])
    cfg = bench.config_from_args(args)
    assert (cfg.vocab_size, cfg.dropout, cfg.qkv_bias, cfg.tie_embeddings) == (100, 0.2, True, False)
    assert bench.settings_from_args(args)["batch_size"] == 3


def test_run_json_prints_one_parsable_line(capsys):
    args = _parse(["--n-layers", "1", "--n-heads", "2", "--emb-dim", "16", "--context-length", "8",
                   "--batch-size", "1", "--steps", "1", "--warmup", "0", "--no-generate", "--json"])
    assert bench.run(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    res = json.loads(out[0])
    assert res["config"]["n_layers"] == 1 and res["batch_size"] == 1 and "generate" not in res


def test_run_prints_a_table(capsys):
    args = _parse(["--n-layers", "1", "--n-heads", "2", "--emb-dim", "16", "--context-length", "8",
                   "--steps", "1", "--warmup", "0", "--gen-tokens", "2"])
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "matmul rate" in out and "KV cache" in out


def test_bad_arguments_are_a_gpt2_error():
    from gpt2 import GPT2Error
    with pytest.raises(GPT2Error):
        bench.bench(TINY, steps=0)
