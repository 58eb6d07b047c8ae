"""GGUF files of the families transformers' GGUF reader does not know: Gemma (1), Cohere Command-R, Baichuan.

kvrun reads these itself: tensors through `gguf.GGUFReader` and `gguf.quants.dequantize`, names through the `gguf`
package's own table for the architecture, matched against the names of the HF model kvrun serves. What llama.cpp's
converter changed on the way in is undone here: Gemma's norms stored as `1 + w`, and Baichuan's fused `W_pack`,
which llama.cpp splits into Q, K and V with Q and K rows interleaved for its rotary layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

# "<arch>." keys every family here states the same way → HF config field.
_SHAPE_KEYS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "vocab_size": "vocab_size",
}


@dataclass(frozen=True)
class Native:
    architecture: str  # the HF architecture kvrun serves the file as
    config_class: str  # transformers config whose model names (and shapes) the HF tensors
    keys: dict[str, str]  # "<arch>." keys this family states → HF config field
    # Tensors whose presence is the only statement of a config flag (GGUF has no key for it) → that flag.
    flags: dict[str, str] = field(default_factory=dict)
    norm_offset: float = 0.0  # llama.cpp stores (1 + w) norms with the 1 added
    fused_qkv: str | None = None  # HF module of Q, K and V in one, which llama.cpp splits (and permutes)
    model_type: str | None = None  # config.json's model_type, when config_class is only a stand-in for the names


NATIVE = {
    "gemma": Native(
        "GemmaForCausalLM",
        "GemmaConfig",
        {**_SHAPE_KEYS, "attention.layer_norm_rms_epsilon": "rms_norm_eps", "attention.key_length": "head_dim"},
        flags={"blk.0.attn_q.bias": "attention_bias"},
        norm_offset=1.0,
    ),
    "command-r": Native(
        "CohereForCausalLM",
        "CohereConfig",
        {**_SHAPE_KEYS, "attention.layer_norm_epsilon": "layer_norm_eps", "logit_scale": "logit_scale"},
        flags={"blk.0.attn_q_norm.weight": "use_qk_norm", "blk.0.attn_q.bias": "attention_bias"},
    ),
    # Baichuan has no transformers class; its layers are Llama's with q/k/v fused, so Llama's names stand in.
    "baichuan": Native(
        "BaichuanForCausalLM",
        "LlamaConfig",
        {**_SHAPE_KEYS, "attention.layer_norm_rms_epsilon": "rms_norm_eps"},
        fused_qkv="W_pack",
        model_type="baichuan",
    ),
}


_REQUIRED = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")


def read_native(reader, arch: str, file_name: str):
    """(config, {HF name: fp32 tensor}) of a file of a NATIVE architecture; every key and tensor placed or refused."""
    family = NATIVE[arch]
    stored = {tensor.name: tensor for tensor in reader.tensors}
    config = _config(reader, arch, family, stored, file_name)
    tensors = _tensors(arch, family, config, stored, file_name)
    if family.fused_qkv:
        _fuse_qkv(tensors, family.fused_qkv, config.num_attention_heads)
    config.architectures = [family.architecture]
    return config, tensors


def _config(reader, arch: str, family: Native, stored: dict, file_name: str):
    import transformers

    from kvrun.runtime.gguf import GGUFError, apply_metadata, metadata

    keys = metadata(reader, arch)
    for short in _REQUIRED:
        if short not in keys:
            raise GGUFError(f"{file_name}: GGUF key {arch}.{short} is missing; kvrun will not guess the model's shape")
    values = {family.keys[short]: value for short, value in keys.items() if short in family.keys}
    # What llama.cpp assumes when a key is absent (not the transformers config's defaults, sized for real models).
    values.setdefault("num_key_value_heads", values["num_attention_heads"])
    if "head_dim" in family.keys.values():
        values.setdefault("head_dim", values["hidden_size"] // values["num_attention_heads"])
    if "vocab_size" not in values and "token_embd.weight" in stored:
        values["vocab_size"] = int(stored["token_embd.weight"].shape[-1])
    values.update({flag: name in stored for name, flag in family.flags.items()})
    values["tie_word_embeddings"] = "output.weight" not in stored
    config = getattr(transformers, family.config_class)(**values)
    apply_metadata(reader, arch, config, file_name, applied=set(family.keys))
    if family.fused_qkv and config.num_key_value_heads != config.num_attention_heads:
        raise GGUFError(f"{file_name}: {arch} with {config.num_key_value_heads} KV heads for "
                        f"{config.num_attention_heads} query heads has no fused {family.fused_qkv} layout")  # fmt: skip
    return config


def _tensors(arch: str, family: Native, config, stored: dict, file_name: str) -> dict[str, torch.Tensor]:
    """The HF model's parameters, each found under its GGUF name (the gguf package's table), shape-checked."""
    import transformers
    from gguf import MODEL_ARCH, get_tensor_name_map

    from kvrun.runtime.gguf import GGUFError

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    names = get_tensor_name_map(MODEL_ARCH[arch.upper().replace("-", "_")], config.num_hidden_layers)
    stored = dict(stored)
    tensors = {}
    for hf_name, shape in expected.items():
        stem, suffix = hf_name.rsplit(".", 1)
        gguf_stem = names.get_name(stem)
        gguf_name = f"{gguf_stem}.{suffix}"
        if gguf_stem is None or gguf_name not in stored:
            raise GGUFError(f"{file_name}: tensor {gguf_name if gguf_stem else hf_name} is missing from the file")
        value = _dequantized(stored.pop(gguf_name))
        if tuple(value.shape) != shape:
            raise GGUFError(f"{file_name}: tensor {gguf_name} has shape {tuple(value.shape)}, the config wants {shape}")
        if family.norm_offset and hf_name.endswith("norm.weight"):
            value = value - family.norm_offset
        tensors[hf_name] = value
    if stored:
        raise GGUFError(f"{file_name}: tensors the {arch} config has no place for: {', '.join(sorted(stored)[:5])}")
    return tensors


def _dequantized(tensor) -> torch.Tensor:
    from gguf.quants import dequantize

    shape = tuple(int(size) for size in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    values = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
    return torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: the reader's arrays map the file


def _fuse_qkv(tensors: dict, fused: str, heads: int) -> None:
    """Baichuan: llama.cpp wrote W_pack's Q and K thirds with each head's rows interleaved (pairs of rotary halves);
    put the halves back and W_pack together again."""
    for name in [name for name in tensors if name.endswith(".self_attn.q_proj.weight")]:
        q, k = (_halves_back(tensors.pop(name.replace("q_proj", leaf)), heads) for leaf in ("q_proj", "k_proj"))
        v = tensors.pop(name.replace("q_proj", "v_proj"))
        tensors[name.replace("q_proj", fused)] = torch.cat((q, k, v)).contiguous()


def _halves_back(weight: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

