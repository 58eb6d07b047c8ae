"""Incremental detokenization: emit only text that can no longer change as more tokens arrive."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

Decode = Callable[..., str]  # decode(token_ids, skip_special_tokens=...) -> text


def text_decoder(tokenizer) -> Decode:
    """The cheapest function that gives exactly `tokenizer.decode`'s text.

    A transformers fast tokenizer's `decode` (4.46 to 5.24) converts the ids to a list, calls the Rust
    tokenizer's `decode(ids, skip_special_tokens=...)` — added and special tokens, byte fallback and the decoder all
    live there — and then, only when `clean_up_tokenization_spaces` is set, edits the text in Python. Without that
    flag and without a subclass that overrides either step, the Rust call is the whole of it, at a third of the
    cost per call (each stream decodes twice a step). Anything else keeps the tokenizer's own `decode`."""
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    kind = type(tokenizer)
    if (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and kind.decode is PreTrainedTokenizerBase.decode
        and kind._decode is PreTrainedTokenizerFast._decode
        and not tokenizer.clean_up_tokenization_spaces
    ):
        return tokenizer._tokenizer.decode
    return tokenizer.decode


@dataclass(slots=True)
class IncrementalDetokenizer:
    tokenizer: object
    skip_special_tokens: bool = True
    prefix_offset: int = 0  # decode from here, so a token's leading-space handling sees its neighbour
    read_offset: int = 0  # tokens before this are already in the emitted text
    _decode: Decode = field(init=False, repr=False)
    # The text of token_ids[prefix_offset:read_offset] while the offsets stay (a step that emits nothing keeps them);
    # token_ids only grow, so those ids never change under it.
    _settled: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._decode = text_decoder(self.tokenizer)

    def step(self, token_ids: list[int]) -> str:
        """Text added by the tokens past read_offset; holds back an incomplete UTF-8 sequence (U+FFFD)."""
        settled = self._settled
        if settled is None:
            settled = self._decode(token_ids[self.prefix_offset : self.read_offset],
                                   skip_special_tokens=self.skip_special_tokens)  # fmt: skip
            self._settled = settled
        full = self._decode(token_ids[self.prefix_offset :], skip_special_tokens=self.skip_special_tokens)
        if len(full) <= len(settled) or full.endswith("\ufffd"):
            return ""
        self.read_offset = len(token_ids)
        self.prefix_offset, self._settled = self._next_window(token_ids)
        return full[len(settled) :]

    def _next_window(self, token_ids: list[int]) -> tuple[int, str]:
        """Where the next step's window starts, up to 4 tokens before read_offset (so a token's leading space sees its
        neighbour), and its settled text. Never inside a character: a byte-fallback run (Llama 2, Mistral) decoded
        from its middle gives U+FFFD for the whole run, and the text after it would never come out. A character has
        at most 4 byte tokens and every one before read_offset is complete, so one of the 4 starts is at a boundary."""
        first = max(0, self.read_offset - 4)
        text = ""
        for start in range(first, self.read_offset):
            text = self._decode(token_ids[start : self.read_offset], skip_special_tokens=self.skip_special_tokens)
            if not text.startswith("\ufffd"):
                return start, text
        # U+FFFD in the text itself (the model's own replacement characters): any start does
        return self.read_offset - 1, text
