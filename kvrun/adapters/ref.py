from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def scaling(self) -> float:
        # PEFT: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (modules rank_pattern/alpha_pattern name differ).
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    @property
    def identity(self) -> str:
        """What the outputs depend on besides the base model and the tokens: the weights and the settings."""
        return f"{self.sha256}:{self.alpha!r}:{self.use_rslora}:{self.settings_digest}"

    def __str__(self) -> str:
        # Registry versions are named `ns/name@3` already; path-loaded ones carry their version only here.
        suffix = f"@{self.version}"
        return self.name if not self.version or self.name.endswith(suffix) else self.name + suffix
