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
        self.prefix_offset, self.read_offset = max(0, self.read_offset - 4), len(token_ids)
        self._settled = None
        return full[len(settled) :]
