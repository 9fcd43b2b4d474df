"""`python -m gpt2 generate`: continue a prompt with a checkpoint of ours or OpenAI's weights,
printing each token as it is made. A checkpoint that names a prompt template (instruction-tuned:
`finetune instruct` records "alpaca") answers the prompt as an instruction, in that template,
and only the answer is printed; --raw continues the prompt as it is."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .. import pretrained
from ..chat import Chat, template_of_checkpoint
from ..checkpoint import load_model, load_tokenizer
from ..errors import GPT2Error
from ..generate import TextStream, check_sampling_args, generate_stream
from ..tokenizer import get_tokenizer
from .flags import add_flag, flag_name, require_positive, use_backend


def add_model_arguments(p) -> None:
    """--checkpoint | --pretrained, --backend, --cache-dir: the model to load (generate, chat, eval)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="a checkpoint directory written by `train` (or "
                     "its run directory: the latest checkpoint)")
    src.add_argument("--pretrained", metavar="NAME_OR_DIR",
                     help="OpenAI's GPT-2 weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl (fetched through "
                     "huggingface_hub into the Hugging Face cache where it is installed, else downloaded "
                     "directly into our cache), or a local directory holding them")
    add_flag(p, "backend")
    p.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="our cache for --pretrained NAME (default $GPT2_CACHE, else "
                   "~/.cache/minigrad-gpt2): a name missing there is downloaded directly into it, not "
                   "through huggingface_hub")


def add_sampling_arguments(p, max_new_tokens: int = 50) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0: greedy; > 0: sample from softmax(logits / T)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample only from the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus sampling: the smallest set of tokens with probability >= P, P in (0, 1]")
    p.add_argument("--seed", type=int, default=None, metavar="N", help="seed for sampling")
    p.add_argument("--no-cache", action="store_true",
                   help="turn the KV cache off (recompute the whole context for every token)")


def add_arguments(p) -> None:
    add_model_arguments(p)
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", metavar="TEXT", help="the text to continue")
    prompt.add_argument("--prompt-file", metavar="FILE",
                        help="read the prompt from a UTF-8 text file ('-': standard input; also read "
                        "from standard input when neither flag is given and it is not a terminal)")
    add_sampling_arguments(p)
    p.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="continue the prompt N times (sample i is seeded with --seed + i)")
    p.add_argument("--raw", action="store_true",
                   help="a checkpoint that names a prompt template (instruction-tuned): continue the prompt "
                   "as it is, instead of answering it as an instruction in the template")


def check_sampling(args) -> None:
    require_positive("--max-new-tokens", args.max_new_tokens)
    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                        names={name: flag_name(name)
                               for name in ("max_new_tokens", "temperature", "top_k", "top_p")})
    if args.seed is not None and args.seed < 0:
        raise GPT2Error(f"--seed must be an integer >= 0, got {args.seed}")


def load_model_and_tokenizer(args):
    """The model --checkpoint or --pretrained names, on --backend, and its tokenizer."""
    if args.cache_dir is not None and args.pretrained is None:
        raise GPT2Error("--cache-dir only applies to --pretrained")
    use_backend(args.backend)
    if args.checkpoint is not None:
        model = load_model(args.checkpoint)
        tokenizer = load_tokenizer(args.checkpoint)   # the one it was trained with (GPT-2's if none recorded)
    else:
        model = pretrained.load_pretrained(args.pretrained, backend=args.backend, cache_dir=args.cache_dir)
        tokenizer = get_tokenizer()
    if model.config.num_classes is not None:
        raise GPT2Error(f"{args.checkpoint} is a classifier ({model.config.num_classes} classes, fine-tuned "
                        "with `finetune classify`), not a language model: it has no head to predict tokens "
                        "with; classify texts from Python with gpt2.finetune.classify_text")
    return model, tokenizer


def read_prompt(args) -> str:
    """--prompt, --prompt-file FILE or '-', or standard input when it is piped."""
    if args.prompt is not None:
        text, where = args.prompt, "--prompt"
    elif args.prompt_file not in (None, "-"):
        path = Path(args.prompt_file)
        if not path.is_file():
            raise GPT2Error(f"--prompt-file {path} does not exist (or is not a file)")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GPT2Error(f"--prompt-file {path} is not valid UTF-8 (byte {exc.start})") from None
        where = f"--prompt-file {path}"
    elif args.prompt_file == "-" or not sys.stdin.isatty():
        text, where = sys.stdin.read(), "the prompt read from standard input"
    else:
        raise GPT2Error("give the text to continue: --prompt TEXT, --prompt-file FILE, or pipe it in")
    if not text:
        raise GPT2Error(f"{where} is empty; give some text to continue")
    return text


def run(args) -> int:
    check_sampling(args)
    require_positive("--num-samples", args.num_samples)
    prompt = read_prompt(args)
    model, tokenizer = load_model_and_tokenizer(args)
    templated = args.checkpoint is not None and not args.raw
    template = template_of_checkpoint(args.checkpoint) if templated else None
    try:
        ids = np.asarray(tokenizer.encode(prompt), dtype=np.int64)
    except GPT2Error as exc:
        raise GPT2Error(f"the prompt: {exc}") from None
    if template is not None:
        return _answer(args, model, tokenizer, template, prompt)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} of {args.num_samples} ---")
        seed = None if args.seed is None else args.seed + i
        stream = TextStream(tokenizer)
        print(tokenizer.decode(ids), end="", flush=True)
        for token in generate_stream(model, ids, args.max_new_tokens, temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p, eos_id=tokenizer.eot_id,
                                     seed=seed, use_cache=not args.no_cache):
            print(stream.add(token), end="", flush=True)
        print(stream.end(), flush=True)
    return 0


def _answer(args, model, tokenizer, template, prompt: str) -> int:
    """The prompt answered as an instruction in the checkpoint's template: only the answer is
    printed, as it is made (gpt2/chat.py's Chat, one turn)."""
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} of {args.num_samples} ---")
        chat = Chat(model, tokenizer, template, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    use_cache=not args.no_cache)
        for piece in chat.reply(prompt, seed=None if args.seed is None else args.seed + i):
            print(piece, end="", flush=True)
        print(flush=True)
    return 0
