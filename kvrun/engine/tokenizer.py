"""The tokenizer and chat template that ship with the model directory (tokenizer.json and friends)."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_tokenizer(model_dir: Path):
    """A transformers fast tokenizer, or None when the directory has none (token-id prompts only)."""
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        logger.warning("%s has no tokenizer: prompts must be token ids", model_dir)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def apply_chat_template(tokenizer, messages: list[dict]) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
