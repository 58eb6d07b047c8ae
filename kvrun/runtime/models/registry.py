"""Which family plug-in reads which checkpoint: one line per family.

A family module declares ARCHITECTURES (HF `architectures[0]` → `model_type`), EXAMPLE (a checkpoint users know)
and `read_config(HFConfig, name) -> ModelConfig`; the shared decoder (decoder.py), loader (weights.py) and LoRA
layer build everything else from the ModelConfig and the model's own modules.
"""

from __future__ import annotations

from types import ModuleType

from kvrun.runtime.models import (
    baichuan, bloom, cohere, falcon, gemma, gpt2, gpt_bigcode, gpt_neox, llama, mistral, mpt, opt, phi, phi3, qwen2,
    starcoder2,
)  # fmt: skip
from kvrun.runtime.models.hf_config import HFConfig, ModelConfigError
from kvrun.runtime.models.spec import ModelConfig

FAMILIES: tuple[ModuleType, ...] = (
    llama, mistral, qwen2, gemma, phi3, starcoder2, cohere, baichuan, gpt2, gpt_neox, opt, phi, gpt_bigcode, falcon,
    bloom, mpt,
)  # fmt: skip

_BY_ARCHITECTURE = {arch: family for family in FAMILIES for arch in family.ARCHITECTURES}
_BY_MODEL_TYPE = {model_type: arch for family in FAMILIES for arch, model_type in family.ARCHITECTURES.items()}


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCHITECTURE)


def architecture_of(raw: dict) -> str:
    """`architectures[0]` when the config names one, else the architecture its `model_type` implies."""
    if not isinstance(raw, dict):
        raise ModelConfigError("config.json must hold a JSON object")
    architectures = raw.get("architectures")
    if architectures:
        if not isinstance(architectures, list) or not isinstance(architectures[0], str):
            raise ModelConfigError(f"config.json's 'architectures' must be a list of names, got {architectures!r}")
        return architectures[0]
    model_type = raw.get("model_type")
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    raise ModelConfigError(
        f"config.json names no architecture and its model_type {model_type!r} is not one kvrun knows "
        f"(supported: {', '.join(supported_architectures())})"
    )


def read_model_config(raw: dict, name: str) -> ModelConfig:
    architecture = architecture_of(raw)
    family = _BY_ARCHITECTURE.get(architecture)
    if family is None:
        raise ModelConfigError(
            f"architecture {architecture!r} is not supported (supported: {', '.join(supported_architectures())})"
        )
    expected_type = family.ARCHITECTURES[architecture]
    model_type = raw.get("model_type")
    if model_type is not None and model_type != expected_type:
        raise ModelConfigError(
            f"config.json says architecture {architecture!r} but model_type {model_type!r} "
            f"(expected {expected_type!r}); kvrun will not guess which one is right"
        )
    return family.read_config(HFConfig(raw, architecture), name)
