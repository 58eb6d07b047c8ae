"""Cohere Command-R / Command-R+: one norm feeding attention and MLP in parallel, mean-subtracting LayerNorm
without bias (in fp32), interleaved rotary, optional per-head q/k LayerNorm, scaled logits."""

from __future__ import annotations

from kvrun.runtime.attention.base import AttentionVariant
from kvrun.runtime.layers.norm import NormSpec
from kvrun.runtime.models.hf_config import HFConfig
from kvrun.runtime.models.spec import AttentionSpec, DecoderSpec, MLPSpec, ModelConfig

ARCHITECTURES = {"CohereForCausalLM": "cohere"}
EXAMPLE = "CohereForAI/c4ai-command-r-v01"


def read_config(config: HFConfig, name: str) -> ModelConfig:
    hidden, heads = config.require("hidden_size"), config.require("num_attention_heads")
    kv_heads = config.kv_heads(heads)
    head_dim = config.number("head_dim", hidden // heads)
    max_positions = config.number("max_position_embeddings", 8192)
    norm = NormSpec("layer", config.number("layer_norm_eps", 1e-5, float), scale_in_fp32=True)
    bias = bool(config.get("attention_bias", False))
    attention = AttentionSpec(
        AttentionVariant(head_dim**-0.5),
        config.rope(head_dim=head_dim, max_position_embeddings=max_positions, default_theta=500000.0, interleaved=True),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=norm if config.get("use_qk_norm", False) else None,
        qk_norm_per_head=True,
    )
    decoder = DecoderSpec(
        norm=norm,
        layers=(attention,) * config.require("num_hidden_layers"),
        mlp=MLPSpec(config.require("intermediate_size"), config.activation("hidden_act", default="silu")),
        block="parallel",
        logit_scale=config.get("logit_scale", 0.0625),
    )
    return config.model_config(
        name, decoder, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_positions, tie_word_embeddings=True, eos_token_id=255001, bos_token_id=5,
    )  # fmt: skip
