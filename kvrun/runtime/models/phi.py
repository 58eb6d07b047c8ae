"""Phi-1, Phi-1.5 and Phi-2: one LayerNorm feeding attention and MLP in parallel, partial rotary
(`partial_rotary_factor`, 0.5 unless set), biases on every projection, "gelu_new" MLP (`fc1`, `fc2`), optional q/k
LayerNorm, and an lm_head with a bias."""

from __future__ import annotations

from kvrun.runtime.attention.base import AttentionVariant
from kvrun.runtime.layers.norm import NormSpec
from kvrun.runtime.models.hf_config import HFConfig
from kvrun.runtime.models.spec import AttentionSpec, DecoderSpec, MLPSpec, ModelConfig

ARCHITECTURES = {"PhiForCausalLM": "phi"}
EXAMPLE = "microsoft/phi-2"
NAMES = {
    "model.norm": "model.final_layernorm",
    "model.layers.{i}.self_attn.q_norm": "model.layers.{i}.self_attn.q_layernorm",
    "model.layers.{i}.self_attn.k_norm": "model.layers.{i}.self_attn.k_layernorm",
}


def read_config(config: HFConfig, name: str) -> ModelConfig:
    hidden, heads = config.require("hidden_size"), config.require("num_attention_heads")
    kv_heads = config.kv_heads(heads)
    head_dim = config.number("head_dim", hidden // heads)
    max_positions = config.number("max_position_embeddings", 2048)
    norm = NormSpec("layer", config.number("layer_norm_eps", 1e-5, float), bias=True)
    rope = config.rope(head_dim=head_dim, max_position_embeddings=max_positions, default_partial=0.5)
    attention = AttentionSpec(AttentionVariant(head_dim**-0.5), rope, o_slice="dense", qkv_bias=True, o_bias=True,
                              qk_norm=norm if config.get("qk_layernorm", False) else None)  # fmt: skip
    mlp = MLPSpec(config.require("intermediate_size"), config.activation("hidden_act", default="gelu_new"),
                  gated=False, in_slices=("fc1",), out_slice="fc2", bias=True)  # fmt: skip
    config.refuse_if(bool(config.get("tie_word_embeddings", False)), "a tied lm_head (with its bias) is not supported")
    decoder = DecoderSpec(
        norm=norm,
        layers=(attention,) * config.require("num_hidden_layers"),
        mlp=mlp,
        block="parallel",
        lm_head_bias=True,
        checkpoint_names=NAMES,
    )
    return config.model_config(
        name, decoder, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_positions, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1,
    )  # fmt: skip
