"""Llama 2 / 3 / 3.1 / 3.2 (and SmolLM, Yi, ...): RMSNorm, gated MLP, rotary in every scaling style."""

from __future__ import annotations

from kvrun.runtime.attention.base import AttentionVariant
from kvrun.runtime.layers.norm import NormSpec
from kvrun.runtime.models.hf_config import HFConfig
from kvrun.runtime.models.spec import AttentionSpec, DecoderSpec, MLPSpec, ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama"}
EXAMPLE = "meta-llama/Llama-3.1-8B-Instruct"


def read_config(config: HFConfig, name: str) -> ModelConfig:
    hidden, heads = config.require("hidden_size"), config.require("num_attention_heads")
    kv_heads = config.kv_heads(heads)
    head_dim = config.number("head_dim", hidden // heads)
    max_positions = config.number("max_position_embeddings", 2048)
    bias = bool(config.get("attention_bias", False))
    attention = AttentionSpec(
        AttentionVariant(head_dim**-0.5),
        config.rope(head_dim=head_dim, max_position_embeddings=max_positions),
        qkv_bias=bias,
        o_bias=bias,
    )
    decoder = DecoderSpec(
        norm=NormSpec("rms", config.number("rms_norm_eps", 1e-6, float)),
        layers=(attention,) * config.require("num_hidden_layers"),
        mlp=MLPSpec(config.require("intermediate_size"), config.activation("hidden_act", default="silu"),
                    bias=bool(config.get("mlp_bias", False))),  # fmt: skip
    )
    return config.model_config(
        name, decoder, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_positions, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1,
    )  # fmt: skip
