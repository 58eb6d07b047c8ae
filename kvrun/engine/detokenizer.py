"""Incremental detokenization: emit only text that can no longer change as more tokens arrive."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class IncrementalDetokenizer:
    tokenizer: object
    skip_special_tokens: bool = True
    prefix_offset: int = 0  # decode from here, so a token's leading-space handling sees its neighbour
    read_offset: int = 0  # tokens before this are already in the emitted text

    def step(self, token_ids: list[int]) -> str:
        """Text added by the tokens past read_offset; holds back an incomplete UTF-8 sequence (U+FFFD)."""
        decode = self.tokenizer.decode
        settled = decode(token_ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip_special_tokens)
        full = decode(token_ids[self.prefix_offset :], skip_special_tokens=self.skip_special_tokens)
        if len(full) <= len(settled) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = max(0, self.read_offset - 4), len(token_ids)
        return full[len(settled) :]
