"""Phi-3 / Phi-3.5 / Phi-4-mini: checkpoints with q/k/v and gate/up already fused, LongRoPE, partial rotary."""

from __future__ import annotations

from kvrun.runtime.attention.base import AttentionVariant
from kvrun.runtime.layers.norm import NormSpec
from kvrun.runtime.models.hf_config import HFConfig
from kvrun.runtime.models.spec import AttentionSpec, DecoderSpec, MLPSpec, ModelConfig

ARCHITECTURES = {"Phi3ForCausalLM": "phi3"}
EXAMPLE = "microsoft/Phi-3.5-mini-instruct"


def read_config(config: HFConfig, name: str) -> ModelConfig:
    hidden, heads = config.require("hidden_size"), config.require("num_attention_heads")
    kv_heads = config.kv_heads(heads)
    head_dim = config.number("head_dim", hidden // heads)
    max_positions = config.number("max_position_embeddings", 4096)
    _compatible_rope_type(config)
    rope = config.rope(
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        original_max_position_embeddings=config.number("original_max_position_embeddings", 4096),
    )
    config.refuse_if(rope.rope_type not in ("default", "longrope"), f"Phi-3 rope type {rope.rope_type!r} is unknown")
    attention = AttentionSpec(
        AttentionVariant(head_dim**-0.5, sliding_window=config.get("sliding_window")), rope, qkv_slices=("qkv_proj",)
    )
    decoder = DecoderSpec(
        norm=NormSpec("rms", config.number("rms_norm_eps", 1e-5, float)),
        layers=(attention,) * config.require("num_hidden_layers"),
        mlp=MLPSpec(config.require("intermediate_size"), config.activation("hidden_act", default="silu"),
                    in_slices=("gate_up_proj",)),  # fmt: skip
    )
    return config.model_config(
        name, decoder, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_positions, tie_word_embeddings=False, eos_token_id=32000, bos_token_id=1,
    )  # fmt: skip


def _compatible_rope_type(config: HFConfig) -> None:
    # Early Phi-3 configs call LongRoPE "su" (or "yarn"); transformers reads both as "longrope".
    for key in ("rope_scaling", "rope_parameters"):
        params = config.raw.get(key)
        if isinstance(params, dict) and (params.get("type") or params.get("rope_type")) in ("su", "yarn"):
            config.raw[key] = {**params, "rope_type": "longrope"}
            config.raw[key].pop("type", None)
