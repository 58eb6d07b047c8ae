"""Mistral: Llama's layers with a sliding attention window on every layer."""

from __future__ import annotations

from kvrun.runtime.attention.base import AttentionVariant
from kvrun.runtime.layers.norm import NormSpec
from kvrun.runtime.models.hf_config import HFConfig
from kvrun.runtime.models.spec import AttentionSpec, DecoderSpec, MLPSpec, ModelConfig

ARCHITECTURES = {"MistralForCausalLM": "mistral"}
EXAMPLE = "mistralai/Mistral-7B-Instruct-v0.3"


def read_config(config: HFConfig, name: str) -> ModelConfig:
    hidden, heads = config.require("hidden_size"), config.require("num_attention_heads")
    kv_heads = config.kv_heads(heads, absent=8)
    head_dim = config.number("head_dim", hidden // heads)
    max_positions = config.number("max_position_embeddings", 4096 * 32)
    config.refuse_if(bool(config.get("layer_types")), "per-layer layer_types belong to Ministral, not Mistral")
    attention = AttentionSpec(
        AttentionVariant(head_dim**-0.5, sliding_window=config.get("sliding_window", 4096)),
        config.rope(head_dim=head_dim, max_position_embeddings=max_positions),
    )
    decoder = DecoderSpec(
        norm=NormSpec("rms", config.number("rms_norm_eps", 1e-6, float)),
        layers=(attention,) * config.require("num_hidden_layers"),
        mlp=MLPSpec(config.require("intermediate_size"), config.activation("hidden_act", default="silu")),
    )
    return config.model_config(
        name, decoder, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_positions, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1,
    )  # fmt: skip
