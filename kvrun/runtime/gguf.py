"""GGUF (llama.cpp) → HF-style directory: dequantized weights, config.json, tokenizer.

transformers reads GGUF for most families: it names tensors through the `gguf` package and undoes llama.cpp's
transforms (Llama's interleaved Q/K rows, Gemma's `norm + 1`). It maps only some metadata keys to the config and
drops the rest without a word, so kvrun checks every key and tensor of the file first: a key that changes the math
is applied to the config or refused by name, never ignored. Families transformers cannot read (Gemma 1, Command-R,
Baichuan) kvrun reads itself (gguf_native.py), through the same key checks and the same output.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors.torch import save_file

logger = logging.getLogger(__name__)

CONVERSION = 2  # part of the converted directory's cache key: bump when the conversion's output changes

# GGUF architecture → the HF architecture kvrun serves it as (transformers reads these files). llama.cpp writes
# Mistral as "llama" without its sliding window, so such a file is a Llama model (transformers may call it Mistral).
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "starcoder2": "Starcoder2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}

# Metadata keys (after "<arch>.") that say nothing about the math, or that transformers maps itself.
_INERT = {"context_length", "rope.scaling.finetuned", "attention.causal", "tensor_data_layout"}
# Keys kvrun applies itself, since transformers drops them for some architectures: key → config field.
_APPLIED = {
    "vocab_size": "vocab_size",
    "attention.key_length": "head_dim",
    "attention.sliding_window": "sliding_window",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
}
# Gemma 2 / 3 27B scale queries by hidden / heads instead of head_dim; llama.cpp tells them by their layer count.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# A rope scaling kvrun can express: GGUF's scaling type → its HF rope type.
_ROPE_SCALING = {"none": None, "linear": "linear", "yarn": "yarn"}


class GGUFError(ValueError):
    """A GGUF file kvrun cannot convert faithfully; the message names the key, tensor or architecture."""


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    from gguf import GGUFReader

    from kvrun.runtime.gguf_native import NATIVE, read_native

    reader = GGUFReader(str(gguf_path))
    arch = str(reader.fields["general.architecture"].contents())
    if arch in NATIVE:
        config, tensors = read_native(reader, arch, gguf_path.name)
        model_type = NATIVE[arch].model_type
    elif arch in ARCHITECTURES:
        config, tensors = _read_with_transformers(reader, arch, gguf_path)
        model_type = None
    else:
        raise GGUFError(
            f"{gguf_path.name}: GGUF architecture {arch!r} is not supported; kvrun converts GGUF files of "
            f"{', '.join(sorted({*ARCHITECTURES, *NATIVE}))}. Give the model's HF directory (config.json + "
            "safetensors) instead"
        )
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    config.name_or_path = str(_field(reader, "general.name") or gguf_path.stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    saved = config.to_dict()
    saved.pop("quantization_config", None)  # the weights written here are dequantized
    if model_type:
        saved["model_type"] = model_type
    (out_dir / "config.json").write_text(json.dumps(saved, indent=2))
    _save_tokenizer(reader, gguf_path, out_dir, through_config=arch not in NATIVE)


def _read_with_transformers(reader, arch: str, gguf_path: Path):
    """transformers reads the tensors (and undoes llama.cpp's transforms); kvrun checks what it made of them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    source, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(source, gguf_file=name)
    apply_metadata(reader, arch, config, name, applied=set(GGUF_CONFIG_MAPPING.get(arch, {})))
    model, info = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=name, config=config, dtype=torch.float32, output_loading_info=True
    )
    if type(model).__name__ not in (ARCHITECTURES[arch], "MistralForCausalLM" if arch == "llama" else None):
        raise GGUFError(f"{name}: read as {type(model).__name__}, expected {ARCHITECTURES[arch]}")
    unplaced = sorted(info.get("unexpected_keys") or ())
    if unplaced:
        raise GGUFError(f"{name}: tensors the {arch} config has no place for: {', '.join(unplaced[:5])}")
    missing = sorted(set(info.get("missing_keys") or ()) - {"lm_head.weight"})
    if missing:
        raise GGUFError(f"{name}: tensors missing from the file: {', '.join(missing[:5])}")
    model.config.architectures = [type(model).__name__]
    return model.config, {key: value.contiguous() for key, value in model.state_dict().items()}


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def metadata(reader, arch: str) -> dict:
    """The file's `<arch>.*` keys, without the prefix."""
    prefix = f"{arch}."
    return {key[len(prefix) :]: _field(reader, key) for key in reader.fields if key.startswith(prefix)}


def apply_metadata(reader, arch: str, config, file_name: str, applied: set[str]) -> None:
    """Every `<arch>.*` key is understood: already applied to config (the `applied` keys), applied here, checked
    inert, or refused."""
    prefix = f"{arch}."
    keys = metadata(reader, arch)
    for short, field in _APPLIED.items():
        if short in keys:
            setattr(config, field, keys[short])
    if "rope.freq_base" in keys:
        _set_rope_theta(config, float(keys["rope.freq_base"]))
    rope_scaling: dict = {}
    for short, value in keys.items():
        key = prefix + short
        if short == "attention.value_length":
            if value != _head_dim(config):
                raise GGUFError(f"{file_name}: {key} = {value} differs from the key length {_head_dim(config)}")
        elif short == "rope.dimension_count":
            _check_rotary_dim(config, int(value), key, file_name)
        elif short.startswith("rope.scaling."):
            rope_scaling[short.removeprefix("rope.scaling.")] = value
        elif short not in applied and short not in _INERT and short not in _APPLIED and short != "rope.freq_base":
            raise GGUFError(f"{file_name}: GGUF key {key} = {value!r} is not understood by kvrun; refusing to guess")
    _apply_rope_scaling(config, rope_scaling, file_name)
    for name in ("bos", "eos", "padding"):
        value = _field(reader, f"tokenizer.ggml.{name}_token_id")
        setattr(config, "pad_token_id" if name == "padding" else f"{name}_token_id", value)
    if arch in _GEMMA_27B_LAYERS:
        # GGUF does not state Gemma's query scale; llama.cpp derives it from the model size, and so does kvrun.
        large = config.num_hidden_layers == _GEMMA_27B_LAYERS[arch]
        config.query_pre_attn_scalar = config.hidden_size // config.num_attention_heads if large else _head_dim(config)
    for tensor in reader.tensors:
        if tensor.name.startswith(("rope_freqs", "rope_factors")):
            raise GGUFError(
                f"{file_name}: tensor {tensor.name} (rope frequency factors baked into the file) is not supported; "
                "give the model's HF directory, whose config states its rope scaling"
            )


def _set_rope_theta(config, theta: float) -> None:
    parameters = getattr(config, "rope_parameters", None)
    if isinstance(parameters, dict) and "rope_theta" in parameters:
        parameters["rope_theta"] = theta
    elif isinstance(parameters, dict) and "full_attention" in parameters:  # per layer type (Gemma 3)
        parameters["full_attention"]["rope_theta"] = theta
    else:
        config.rope_theta = theta


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _check_rotary_dim(config, rotary_dim: int, key: str, file_name: str) -> None:
    partial = getattr(config, "partial_rotary_factor", 1.0) or 1.0
    expected = int(_head_dim(config) * partial)
    if rotary_dim != expected:
        raise GGUFError(f"{file_name}: {key} = {rotary_dim}, but the config rotates {expected} dims per head")


def _apply_rope_scaling(config, scaling: dict, file_name: str) -> None:
    kind = scaling.pop("type", "none")
    if kind not in _ROPE_SCALING:
        raise GGUFError(f"{file_name}: rope scaling type {kind!r} is not supported (kvrun maps none, linear, yarn)")
    rope_type = _ROPE_SCALING[kind]
    if rope_type is None:
        return
    update = {"rope_type": rope_type, "factor": float(scaling.pop("factor"))}
    if "original_context_length" in scaling:
        update["original_max_position_embeddings"] = int(scaling.pop("original_context_length"))
    if scaling:
        raise GGUFError(f"{file_name}: rope scaling keys {sorted(scaling)} are not supported")
    parameters = getattr(config, "rope_parameters", None)
    if not isinstance(parameters, dict):
        config.rope_scaling = update
    elif "full_attention" in parameters:  # per layer type (Gemma 3): the scaling is the global layers'
        parameters["full_attention"].update(update)
    else:
        parameters.update(update)


def _save_tokenizer(reader, gguf_path: Path, out_dir: Path, through_config: bool) -> None:
    """transformers builds the tokenizer from the file's `tokenizer.ggml.*` keys. AutoTokenizer reads the model
    config first, which it cannot for the architectures kvrun reads itself: those get the plain fast tokenizer,
    built the same way."""
    if "tokenizer.ggml.model" not in reader.fields:
        logger.warning("%s carries no tokenizer: prompts must be token ids", gguf_path.name)
        return
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    loader = AutoTokenizer if through_config else PreTrainedTokenizerFast
    tokenizer = loader.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))
