from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

NEVER = 1 << 62  # an adapter start past every position: the adapter applies nowhere (an aLoRA never invoked)


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """An adapter's immutable identity. Names are aliases that can move; slots and caches key on this."""

    name: str
    version: int
    sha256: str  # of adapter_model.safetensors
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False
    # sha256 of every adapter_config.json setting that shapes the outputs (per-module ranks and alphas, variants...)
    settings_digest: str = ""
    # Activated LoRA (PEFT's alora_invocation_tokens): the token ids that switch the adapter on; None = plain LoRA
    invocation_tokens: tuple[int, ...] | None = None

    @property
    def scaling(self) -> float:
        # PEFT: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (modules rank_pattern/alpha_pattern name differ).
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    def start_position(self, prompt_token_ids: Sequence[int]) -> int:
        """The first position of a sequence with this prompt that the adapter applies to; the positions before it run
        the base model. A plain LoRA applies everywhere (0). An activated LoRA applies from the start of the last
        occurrence of its invocation tokens in the prompt on, the invocation tokens and every generated token
        included; where the prompt holds no occurrence it applies nowhere (NEVER). This is PEFT's
        `calculate_alora_offsets`, which generate() computes once from the prompt."""
        invocation = self.invocation_tokens
        if invocation is None:
            return 0
        width, first = len(invocation), invocation[0]
        for start in range(len(prompt_token_ids) - width, -1, -1):
            if prompt_token_ids[start] == first and tuple(prompt_token_ids[start : start + width]) == invocation:
                return start
        return NEVER

    @property
    def identity(self) -> str:
        """What the outputs depend on besides the base model and the tokens: the weights and the settings."""
        return f"{self.sha256}:{self.alpha!r}:{self.use_rslora}:{self.settings_digest}"

    def __str__(self) -> str:
        # Registry versions are named `ns/name@3` already; path-loaded ones carry their version only here.
        suffix = f"@{self.version}"
        return self.name if not self.version or self.name.endswith(suffix) else self.name + suffix
