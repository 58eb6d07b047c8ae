"""GPT-NeoX (Pythia, GPT-NeoX-20B, StableLM-alpha): q/k/v fused per head in `query_key_value`, partial rotary
(`rotary_pct`), LayerNorm with bias, plain GeLU MLP, parallel attention + MLP residual (`use_parallel_residual`)
and an untied `embed_out` head."""

from __future__ import annotations

from kvrun.runtime.attention.base import AttentionVariant
from kvrun.runtime.layers.norm import NormSpec
from kvrun.runtime.models.hf_config import HFConfig
from kvrun.runtime.models.spec import AttentionSpec, DecoderSpec, MLPSpec, ModelConfig

ARCHITECTURES = {"GPTNeoXForCausalLM": "gpt_neox"}
EXAMPLE = "EleutherAI/pythia-1.4b"
NAMES = {
    "model": "gpt_neox",
    "model.embed_tokens": "gpt_neox.embed_in",
    "model.layers.{i}.self_attn": "gpt_neox.layers.{i}.attention",
    "model.norm": "gpt_neox.final_layer_norm",
    "lm_head": "embed_out",
}


def read_config(config: HFConfig, name: str) -> ModelConfig:
    hidden, heads = config.require("hidden_size"), config.require("num_attention_heads")
    head_dim = hidden // heads
    max_positions = config.number("max_position_embeddings", 2048)
    rope = config.rope(head_dim=head_dim, max_position_embeddings=max_positions, theta_key="rotary_emb_base",
                       partial_key="rotary_pct", default_partial=0.25)  # fmt: skip
    bias = bool(config.get("attention_bias", True))
    attention = AttentionSpec(
        AttentionVariant(head_dim**-0.5), rope, qkv_slices=("query_key_value",), o_slice="dense",
        qkv_layout="grouped", qkv_bias=bias, o_bias=bias,
    )  # fmt: skip
    mlp = MLPSpec(config.require("intermediate_size"), config.activation("hidden_act", default="gelu"), gated=False,
                  in_slices=("dense_h_to_4h",), out_slice="dense_4h_to_h", bias=True)  # fmt: skip
    decoder = DecoderSpec(
        norm=NormSpec("layer", config.number("layer_norm_eps", 1e-5, float), bias=True),
        layers=(attention,) * config.require("num_hidden_layers"),
        mlp=mlp,
        block="parallel2" if config.get("use_parallel_residual", True) else "sequential",
        checkpoint_names=NAMES,
    )
    return config.model_config(
        name, decoder, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
        max_position_embeddings=max_positions, tie_word_embeddings=False, eos_token_id=2, bos_token_id=0,
    )  # fmt: skip
