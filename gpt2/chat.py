"""Chatting with a model: prompt templates, and one conversation turn by turn.

    chat = Chat(model, tokenizer, template=template_of_checkpoint("runs/alpaca"))
    for piece in chat.reply("Name three primary colours."):   # text as it is generated
        print(piece, end="", flush=True)

A model fine-tuned on instructions was trained on text laid out by a prompt template, and
answers best when prompted the same way. A checkpoint names its template in tokenizer.json
(`"prompt_template": "alpaca"`); then every turn is added to the conversation in that layout,
so the model sees what was said before (as much as fits its context, newest kept), and its
answer ends at <|endoftext|> or where it starts the next turn's heading. A checkpoint that names
none (every pretrained model) gets plain continuation: each line is a prompt of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import GPT2Error
from .generate import TextStream, generate_stream


@dataclass(frozen=True)
class PromptTemplate:
    """How one turn is laid out: `preamble` once at the start, then `turn` with {instruction}
    filled in, and the model's answer after it; `stop` ends an answer (the next turn's heading)."""
    name: str
    preamble: str
    turn: str
    stop: str
    separator: str = "\n\n"   # after an answer, before the next turn


# Alpaca's template (Taori et al., 2023), as *LLMs from Scratch* chapter 7 fine-tunes with it.
ALPACA = PromptTemplate(
    name="alpaca",
    preamble="Below is an instruction that describes a task. Write a response that appropriately "
             "completes the request.\n\n",
    turn="### Instruction:\n{instruction}\n\n### Response:\n",
    stop="\n### ")

PROMPT_TEMPLATES = {"alpaca": ALPACA}


def template_from_record(record) -> PromptTemplate | None:
    """The template a tokenizer record (a checkpoint's tokenizer.json) names, or None."""
    name = record.get("prompt_template") if isinstance(record, dict) else None
    if name is None:
        return None
    if name not in PROMPT_TEMPLATES:
        raise GPT2Error(f"the prompt template {name!r} is not one this version knows "
                        f"({', '.join(PROMPT_TEMPLATES)})")
    return PROMPT_TEMPLATES[name]


def template_of_checkpoint(path) -> PromptTemplate | None:
    """The prompt template the checkpoint at `path` names in its tokenizer.json, or None."""
    from .checkpoint import TOKENIZER_FILE, resolve_checkpoint  # noqa: PLC0415

    file = resolve_checkpoint(path) / TOKENIZER_FILE
    if not file.is_file():
        return None
    try:
        record = json.loads(Path(file).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise GPT2Error(f"{file} is not valid JSON (the checkpoint is damaged)") from None
    try:
        return template_from_record(record)
    except GPT2Error as exc:
        raise GPT2Error(f"{file}: {exc}") from None


class Chat:
    """One conversation with `model`: `reply(text)` yields the answer's text as it is generated.

    With a template the whole conversation so far is the prompt (its start cropped to leave
    room in the model's context for `max_new_tokens`, or half the context if that is less);
    without one, each message alone."""

    def __init__(self, model, tokenizer, template: PromptTemplate | None = None, max_new_tokens: int = 200,
                 **sampling):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.history: list[tuple[str, str]] = []   # (message, answer) pairs

    def prompt(self, message: str) -> str:
        """The text the model continues for `message`."""
        t = self.template
        if t is None:
            return message
        past = "".join(t.turn.format(instruction=m) + a + t.separator for m, a in self.history)
        return t.preamble + past + t.turn.format(instruction=message)

    def _ids(self, message: str) -> np.ndarray:
        ids = self.tokenizer.encode(self.prompt(message))
        if self.template is not None:   # the newest turns, with room for the answer (up to half the context)
            ctx = self.model.config.context_length
            ids = ids[-(ctx - min(self.max_new_tokens, ctx // 2)):]
        return np.asarray(ids, dtype=np.int64)   # (generate itself feeds the model the last context_length)

    def reply(self, message: str, seed: int | None = None):
        """Yields the answer to `message`, piece by piece; it joins the history at the end."""
        ids = self._ids(message)
        stream, answer, shown = TextStream(self.tokenizer), "", 0
        stop = self.template.stop if self.template is not None else None
        for token in generate_stream(self.model, ids, self.max_new_tokens, eos_id=self.tokenizer.eot_id,
                                     seed=seed, **self.sampling):
            answer += stream.add(token)
            if stop is not None and stop in answer:
                answer = answer[:answer.index(stop)]
                break
            # show what cannot be the start of the stop text
            safe = len(answer) - _partial_suffix(answer, stop) if stop else len(answer)
            if safe > shown:
                yield answer[shown:safe]
                shown = safe
        else:
            answer += stream.end()
        if stop is not None and stop in answer:
            answer = answer[:answer.index(stop)]
        if len(answer) > shown:
            yield answer[shown:]
        self.history.append((message, answer.strip() if self.template else answer))


def _partial_suffix(text: str, stop: str) -> int:
    """The length of the longest end of `text` that is a beginning of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
