"""gpt2: the GPT-2 model, tokenizer, data, training, generation and CLI, built on minigrad."""

from .config import (
    MODEL_SIZES,
    GPTConfig,
    config_for,
    course_config,
    gpt2_124m,
    gpt2_large,
    gpt2_medium,
    gpt2_xlarge,
)
from .errors import GPT2Error
from .generate import generate, next_token
from .model import GPTModel, KVCache

__all__ = [
    "GPT2Error", "GPTConfig", "GPTModel", "KVCache", "MODEL_SIZES", "config_for", "course_config",
    "generate", "gpt2_124m", "gpt2_large", "gpt2_medium", "gpt2_xlarge", "next_token",
]
