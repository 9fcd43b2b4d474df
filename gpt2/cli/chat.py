"""`python -m gpt2 chat`: a conversation with a model, one line of input per turn (gpt2/chat.py).

Reads standard input line by line, so it works typed at a terminal and piped from a file:

    python -m gpt2 chat --checkpoint runs/alpaca
    printf 'Hello\n/quit\n' | python -m gpt2 chat --checkpoint runs/alpaca
"""

from __future__ import annotations

import sys

from ..chat import Chat, template_of_checkpoint
from ..errors import GPT2Error
from .generate import add_model_arguments, add_sampling_arguments, check_sampling, load_model_and_tokenizer

QUIT = ("/quit", "/exit")


def add_arguments(p) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p, max_new_tokens=100)


def run(args) -> int:
    check_sampling(args)
    model, tokenizer = load_model_and_tokenizer(args)
    template = template_of_checkpoint(args.checkpoint) if args.checkpoint is not None else None
    chat = Chat(model, tokenizer, template, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, use_cache=not args.no_cache)
    interactive = sys.stdin.isatty()
    mode = (f"{template.name} prompt template: the model sees the conversation so far" if template else
            "no prompt template: each line is continued on its own")
    print(f"chat ({mode}); /quit or Ctrl-D to end", file=sys.stderr, flush=True)
    turn = 0
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:   # end of input
            break
        message = line.rstrip("\n")
        if message.strip() in QUIT:
            break
        if not message.strip():
            continue
        seed = None if args.seed is None else args.seed + turn
        try:
            for piece in chat.reply(message, seed=seed):
                print(piece, end="", flush=True)
        except GPT2Error as exc:   # e.g. a character outside a char model's vocabulary: next line
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
            continue
        print(flush=True)
        turn += 1
    return 0
