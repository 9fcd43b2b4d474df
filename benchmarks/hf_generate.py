#!/usr/bin/env python
"""Greedy generation with Hugging Face's GPT2LMHeadModel on the CPU, with and without the KV
cache: the reference for the generation figures of `python -m gpt2 bench`.

GPT-2 124M's shape (vocab 50,257, 12 layers, 12 heads, 768 wide) with random weights (speed does
not depend on their values), float32, eval mode, batch 1: a `--prompt-len`-token random prompt
extended by `--new-tokens` greedy tokens with `model.generate(do_sample=False)`. The median of
`--runs` timed runs after `--warmup` untimed ones, in tokens per second.

    python benchmarks/hf_generate.py            # 100 new tokens after a 10-token prompt
    python benchmarks/hf_generate.py --json     # one JSON line

Needs torch and transformers (`pip install -e ".[bench-torch]"`); minigrad-gpt2 never imports them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=100, help="tokens to generate (100)")
    p.add_argument("--prompt-len", type=int, default=10, help="tokens in the random prompt (10)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per setting (3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (1)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and prompt (0)")
    p.add_argument("--json", action="store_true", help="print one JSON line of results")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        print("error: this reference needs PyTorch and transformers: pip install torch transformers "
              "(or the bench-torch extra)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(GPT2Config()).eval()     # 124M: OpenAI's shape, random weights
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len))
    mask = torch.ones_like(prompt)

    res = {"bench": "hf_generate", "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
           "threads": args.threads, "runs": args.runs,
           "params": sum(p.numel() for p in model.parameters()),
           "attn_implementation": model.config._attn_implementation,
           "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version()}
    outputs = {}
    for use_cache in (True, False):
        times = []
        for i in range(args.warmup + args.runs):
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(prompt, attention_mask=mask, max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens, do_sample=False,
                                     use_cache=use_cache, pad_token_id=model.config.eos_token_id)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        outputs[use_cache] = out
        n = out.shape[1] - args.prompt_len
        res["cache" if use_cache else "no_cache"] = {
            "run_times_s": [round(t, 3) for t in times],
            "tokens_per_s": round(n / statistics.median(times), 2)}
    res["same_tokens_cache_vs_no_cache"] = bool(torch.equal(outputs[True], outputs[False]))
    if args.json:
        print(json.dumps(res))
    else:
        print(f"transformers {res['transformers']}, torch {res['torch']}, {args.threads} threads, "
              f"attention {res['attn_implementation']}: {args.new_tokens} tokens after a "
              f"{args.prompt_len}-token prompt, batch 1, greedy")
        print(f"with the KV cache  {res['cache']['tokens_per_s']:.1f} tokens/s\n"
              f"without            {res['no_cache']['tokens_per_s']:.1f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
