"""`python -m gpt2 generate`: continue a prompt with a checkpoint of ours or OpenAI's weights."""

from __future__ import annotations

import numpy as np

from .. import pretrained
from ..checkpoint import load_model, load_tokenizer
from ..errors import GPT2Error
from ..generate import check_sampling_args, generate
from ..tokenizer import get_tokenizer
from .flags import flag_name, require_positive, use_backend


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="a checkpoint directory written by `train`")
    src.add_argument("--pretrained", metavar="NAME_OR_DIR",
                     help="OpenAI's GPT-2 weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a local "
                     "directory holding them")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=50, metavar="N", help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0: greedy; > 0: sample from softmax(logits / T)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample only from the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus sampling: the smallest set of tokens with probability >= P, P in (0, 1]")
    p.add_argument("--seed", type=int, default=None, metavar="N", help="seed for sampling")
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy",
                   help="numpy (CPU) or cupy (NVIDIA GPU)")
    p.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="where --pretrained weights are downloaded and cached")
    p.add_argument("--no-cache", action="store_true",
                   help="turn the KV cache off (recompute the whole context for every token)")


def run(args) -> int:
    require_positive("--max-new-tokens", args.max_new_tokens)
    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                        names={name: flag_name(name)
                               for name in ("max_new_tokens", "temperature", "top_k", "top_p")})
    if args.cache_dir is not None and args.pretrained is None:
        raise GPT2Error("--cache-dir only applies to --pretrained")
    if not args.prompt:
        raise GPT2Error("--prompt must not be empty")
    if args.seed is not None and args.seed < 0:
        raise GPT2Error(f"--seed must be an integer >= 0, got {args.seed}")
    use_backend(args.backend)

    if args.checkpoint is not None:
        model = load_model(args.checkpoint)
        tokenizer = load_tokenizer(args.checkpoint)   # the one it was trained with (GPT-2's if none recorded)
    else:
        model = pretrained.load_pretrained(args.pretrained, backend=args.backend, cache_dir=args.cache_dir)
        tokenizer = get_tokenizer()
    ids = np.asarray(tokenizer.encode(args.prompt), dtype=np.int64)[None, :]
    out = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, eos_id=tokenizer.eot_id, seed=args.seed, use_cache=not args.no_cache)
    print(tokenizer.decode(out[0]))
    return 0
