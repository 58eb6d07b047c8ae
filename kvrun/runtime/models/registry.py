"""Architecture name (config.json `architectures[0]`) → decoder class."""

from __future__ import annotations

from torch import nn

from kvrun.runtime.models.llama import LlamaForCausalLM

_ARCHITECTURES: dict[str, type[nn.Module]] = {"LlamaForCausalLM": LlamaForCausalLM}


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _ARCHITECTURES:
        supported = ", ".join(sorted(_ARCHITECTURES))
        raise ValueError(f"architecture {architecture!r} is not supported (supported: {supported})")
    return _ARCHITECTURES[architecture]
