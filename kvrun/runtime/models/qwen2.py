"""Qwen2 / Qwen2.5 and Qwen3: biased q/k/v (Qwen2) or per-head q/k RMSNorm (Qwen3), optional sliding layers."""

from __future__ import annotations

from kvrun.runtime.attention.base import AttentionVariant
from kvrun.runtime.layers.norm import NormSpec
from kvrun.runtime.models.hf_config import HFConfig
from kvrun.runtime.models.spec import AttentionSpec, DecoderSpec, MLPSpec, ModelConfig

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
EXAMPLE = "Qwen/Qwen2.5-7B-Instruct, Qwen/Qwen3-8B"


def read_config(config: HFConfig, name: str) -> ModelConfig:
    qwen3 = config.architecture == "Qwen3ForCausalLM"
    hidden, heads = config.require("hidden_size"), config.require("num_attention_heads")
    kv_heads = config.kv_heads(heads, absent=32)
    head_dim = config.number("head_dim", 128 if qwen3 else hidden // heads)
    max_positions = config.number("max_position_embeddings", 32768)
    num_layers = config.require("num_hidden_layers")
    window = config.get("sliding_window", 4096) if config.get("use_sliding_window", False) else None
    first_sliding = config.number("max_window_layers", 28)
    types = config.layer_types(
        ["sliding_attention" if window is not None and i >= first_sliding else "full_attention" for i in range(num_layers)]
    )
    norm = NormSpec("rms", config.number("rms_norm_eps", 1e-6, float))
    rope = config.rope(head_dim=head_dim, max_position_embeddings=max_positions)
    bias = bool(config.get("attention_bias", False)) if qwen3 else True
    layers = tuple(
        AttentionSpec(
            AttentionVariant(head_dim**-0.5, sliding_window=window if kind == "sliding_attention" else None),
            rope,
            qkv_bias=bias,
            o_bias=bias and qwen3,
            qk_norm=norm if qwen3 else None,
        )
        for kind in types
    )
    decoder = DecoderSpec(
        norm=norm,
        layers=layers,
        mlp=MLPSpec(config.require("intermediate_size"), config.activation("hidden_act", default="silu")),
    )
    return config.model_config(
        name, decoder, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_positions, tie_word_embeddings=False, eos_token_id=None, bos_token_id=None,
    )  # fmt: skip
