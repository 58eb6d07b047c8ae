"""Gemma, Gemma 2 and Gemma 3 (text): (1 + w) RMSNorm, scaled embeddings, GeLU-tanh MLP; Gemma 2/3 add sandwich
norms around attention and MLP, alternating sliding-window layers, attention scale from query_pre_attn_scalar and
logit soft-capping (Gemma 2), q/k norms and per-layer-type rotary bases (Gemma 3)."""

from __future__ import annotations

from kvrun.runtime.attention.base import AttentionVariant
from kvrun.runtime.layers.norm import NormSpec
from kvrun.runtime.models.hf_config import HFConfig
from kvrun.runtime.models.spec import AttentionSpec, DecoderSpec, MLPSpec, ModelConfig

ARCHITECTURES = {"GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text"}
EXAMPLE = "google/gemma-2-9b-it, google/gemma-3-1b-it"
LAYER_TYPES = ("full_attention", "sliding_attention")


def read_config(config: HFConfig, name: str) -> ModelConfig:
    version = {"GemmaForCausalLM": 1, "Gemma2ForCausalLM": 2, "Gemma3ForCausalLM": 3}[config.architecture]
    hidden, heads = config.require("hidden_size"), config.require("num_attention_heads")
    kv_heads = config.kv_heads(heads, absent=16 if version == 1 else 4)
    head_dim = config.number("head_dim", 256)
    num_layers = config.require("num_hidden_layers")
    max_positions = config.number("max_position_embeddings", {1: 8192, 2: 8192, 3: 131072}[version])
    norm = NormSpec("rms", config.number("rms_norm_eps", 1e-6, float), weight_offset=1.0, scale_in_fp32=True)
    bias = bool(config.get("attention_bias", False))
    config.refuse_if(bool(config.get("use_bidirectional_attention")), "use_bidirectional_attention is not supported")
    if version == 1:
        activation = config.activation("hidden_act", default="gelu_pytorch_tanh")
        rope = config.rope(head_dim=head_dim, max_position_embeddings=max_positions)
        layers = (AttentionSpec(AttentionVariant(head_dim**-0.5), rope, qkv_bias=bias, o_bias=bias),) * num_layers
    else:
        activation = config.activation("hidden_activation", default="gelu_pytorch_tanh")
        scale = config.number("query_pre_attn_scalar", 256, float) ** -0.5
        window = config.get("sliding_window", 4096)
        pattern = config.number("sliding_window_pattern", 6) if version == 3 else 2
        types = config.layer_types(
            ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
        )
        soft_cap = config.get("attn_logit_softcapping", 50.0 if version == 2 else None)
        ropes = {kind: _rope(config, version, kind, head_dim, max_positions) for kind in LAYER_TYPES}
        layers = tuple(
            AttentionSpec(
                AttentionVariant(scale, window if kind == "sliding_attention" else None, soft_cap),
                ropes[kind],
                qkv_bias=bias,
                o_bias=bias,
                qk_norm=norm if version == 3 else None,
            )
            for kind in types
        )
    decoder = DecoderSpec(
        norm=norm,
        layers=layers,
        mlp=MLPSpec(config.require("intermediate_size"), activation),
        block="sequential" if version == 1 else "sandwich",
        embedding_scale=hidden**0.5,
        final_logit_soft_cap=config.get("final_logit_softcapping", 30.0) if version == 2 else
        config.get("final_logit_softcapping"),
    )  # fmt: skip
    return config.model_config(
        name, decoder, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_positions, tie_word_embeddings=True, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip


def _rope(config: HFConfig, version: int, kind: str, head_dim: int, max_positions: int):
    if version == 2:
        return config.rope(head_dim=head_dim, max_position_embeddings=max_positions)
    # Gemma 3: local (sliding) layers rotate with rope_local_base_freq and no scaling; global ones with rope_theta.
    if "rope_parameters" in config.raw and any(key in LAYER_TYPES for key in config.raw["rope_parameters"] or {}):
        return config.rope(head_dim=head_dim, max_position_embeddings=max_positions, default_theta=1_000_000.0,
                           layer_type=kind, layer_types=LAYER_TYPES)  # fmt: skip
    if kind == "sliding_attention":
        theta = config.number("rope_local_base_freq", 10_000.0, float)
        local = HFConfig({"rope_theta": theta}, config.architecture)
        return local.rope(head_dim=head_dim, max_position_embeddings=max_positions)
    return config.rope(head_dim=head_dim, max_position_embeddings=max_positions, default_theta=1_000_000.0)
