"""Checks on `adapter_config.json`: a plain LoRA that the kvrun engine can apply, nothing else.

PEFT grows new LoraConfig fields with every release, so unknown fields are accepted while they hold their
"off" value (None, False, empty) and rejected as soon as they switch a feature on: a feature the engine
does not implement would otherwise be silently ignored and serve wrong outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from adapters_registry.errors import AdapterConfigError, RankError, UnsupportedConfigError

CONFIG_FILE = "adapter_config.json"

# Fields that may hold any value: bookkeeping, training-only or initialization-only settings.
_HARMLESS_FIELDS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "bias",
    "use_rslora", "init_lora_weights", "layers_to_transform", "layers_pattern", "megatron_core",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size",
    "ensure_weight_tying",
}  # fmt: skip

# Fields the engine does not implement, with the reason given to the user when they are switched on.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA adds a magnitude vector the engine does not apply",
    "modules_to_save": "fully fine-tuned modules (modules_to_save) cannot be hot-swapped per request",
    "rank_pattern": "per-module ranks (rank_pattern) are not supported; use one r for all modules",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not supported; use one lora_alpha",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style transposed weights) is not supported",
    "lora_bias": "LoRA bias terms (lora_bias) are not supported",
    "layer_replication": "layer_replication changes the base model's layer layout",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QALoRA is not supported",
    "megatron_config": "Megatron-parallel LoRA layers are not supported",
}


@dataclass(frozen=True, slots=True)
class LoraSettings:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool
    base_model: str | None


def parse_config(data: bytes, *, max_rank: int) -> LoraSettings:
    """Parse adapter_config.json bytes; raise a ValidationError subclass naming the field."""
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise AdapterConfigError(f"{CONFIG_FILE} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise AdapterConfigError(f"{CONFIG_FILE} must be a JSON object")
    _check_feature_fields(config)
    if config.get("peft_type") != "LORA":
        raise UnsupportedConfigError(
            f"{CONFIG_FILE}: peft_type is {config.get('peft_type')!r}; only 'LORA' adapters are served"
        )
    rank = config.get("r")
    if type(rank) is not int or rank < 1:
        raise AdapterConfigError(f"{CONFIG_FILE}: r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise RankError(f"{CONFIG_FILE}: r={rank} exceeds the registry's maximum rank {max_rank}")
    alpha = config.get("lora_alpha", 8)
    if type(alpha) not in (int, float) or not 0 < alpha < float("inf"):
        raise AdapterConfigError(f"{CONFIG_FILE}: lora_alpha must be a positive number, got {alpha!r}")
    use_rslora = config.get("use_rslora", False)
    if type(use_rslora) is not bool:
        raise AdapterConfigError(f"{CONFIG_FILE}: use_rslora must be true or false, got {use_rslora!r}")
    base_model = config.get("base_model_name_or_path")
    if base_model is not None and not isinstance(base_model, str):
        raise AdapterConfigError(f"{CONFIG_FILE}: base_model_name_or_path must be a string")
    return LoraSettings(rank, float(alpha), _target_modules(config), use_rslora, base_model or None)


def _check_feature_fields(config: dict[str, object]) -> None:
    bias = config.get("bias", "none")
    if bias != "none":
        raise UnsupportedConfigError(f"{CONFIG_FILE}: bias={bias!r} trains base-layer biases; only 'none' is served")
    for field, value in config.items():
        if field in _HARMLESS_FIELDS or value in (None, False, "", [], {}):
            continue
        reason = _UNSUPPORTED_FIELDS.get(field, "this registry does not know the field, so it cannot be served safely")
        raise UnsupportedConfigError(f"{CONFIG_FILE}: unsupported field {field}={value!r}: {reason}")


def _target_modules(config: dict[str, object]) -> tuple[str, ...]:
    modules = config.get("target_modules")
    if isinstance(modules, str):
        raise UnsupportedConfigError(
            f"{CONFIG_FILE}: target_modules is the pattern {modules!r}; list the module names instead"
        )
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) and m for m in modules):
        raise AdapterConfigError(f"{CONFIG_FILE}: target_modules must be a non-empty list of module names")
    return tuple(sorted(set(modules)))
