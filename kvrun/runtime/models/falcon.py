"""Falcon (7B, 40B, 180B, Falcon2-11B): q/k/v fused as `query_key_value` in each of its layouts (multi-query q | k |
v; per head; and new_decoder_architecture's groups of queries with their key and value), rotary, LayerNorm with
bias, attention and MLP in parallel from one norm or two (`ln_attn`, `ln_mlp`), or one after the other."""

from __future__ import annotations

from kvrun.runtime.attention.base import AttentionVariant
from kvrun.runtime.layers.norm import NormSpec
from kvrun.runtime.models.hf_config import HFConfig
from kvrun.runtime.models.spec import AttentionSpec, DecoderSpec, MLPSpec, ModelConfig

ARCHITECTURES = {"FalconForCausalLM": "falcon"}
EXAMPLE = "tiiuae/falcon-7b-instruct, tiiuae/falcon-11B"
NAMES = {
    "model": "transformer",
    "model.embed_tokens": "transformer.word_embeddings",
    "model.layers.{i}": "transformer.h.{i}",
    "model.layers.{i}.self_attn": "transformer.h.{i}.self_attention",
    "model.norm": "transformer.ln_f",
}
TWO_NORMS = {"model.layers.{i}.input_layernorm": "transformer.h.{i}.ln_attn",
             "model.layers.{i}.post_attention_layernorm": "transformer.h.{i}.ln_mlp"}  # fmt: skip
KEYS = {"num_attention_heads": "n_head", "num_hidden_layers": "n_layer", "num_kv_heads": "n_head_kv"}


def read_config(config: HFConfig, name: str) -> ModelConfig:
    config.rename_keys(KEYS)
    hidden, heads = config.require("hidden_size"), config.require("num_attention_heads")
    head_dim = hidden // heads
    max_positions = config.number("max_position_embeddings", 2048)
    config.refuse_if(bool(config.get("alibi", False)), "Falcon's ALiBi variant (alibi=true) is not supported")
    new_layout = bool(config.get("new_decoder_architecture", False))
    parallel = bool(config.get("parallel_attn", True))
    num_norms = config.number("num_ln_in_parallel_attn", 2 if new_layout else 1)
    config.refuse_if(new_layout and not parallel, "new_decoder_architecture without parallel_attn is not supported")
    if new_layout:
        kv_heads, layout = config.number("num_kv_heads", heads), "grouped"
    elif config.get("multi_query", True):
        kv_heads, layout = 1, "split"
    else:
        kv_heads, layout = heads, "grouped"
        config.refuse_if(config.number("num_kv_heads", heads) != heads,
                         "without multi_query or new_decoder_architecture, num_kv_heads must equal the head count")  # fmt: skip
    bias = bool(config.get("bias", False))
    attention = AttentionSpec(
        AttentionVariant(head_dim**-0.5), config.rope(head_dim=head_dim, max_position_embeddings=max_positions),
        qkv_slices=("query_key_value",), o_slice="dense", qkv_layout=layout, qkv_bias=bias, o_bias=bias,
    )  # fmt: skip
    mlp = MLPSpec(config.get("ffn_hidden_size") or 4 * hidden, config.activation("activation", default="gelu"),
                  gated=False, in_slices=("dense_h_to_4h",), out_slice="dense_4h_to_h", bias=bias)  # fmt: skip
    two_norms = new_layout and num_norms == 2
    decoder = DecoderSpec(
        norm=NormSpec("layer", config.number("layer_norm_epsilon", 1e-5, float), bias=True),
        layers=(attention,) * config.require("num_hidden_layers"),
        mlp=mlp,
        block="parallel2" if two_norms else "parallel" if parallel else "sequential",
        checkpoint_names={**NAMES, **TWO_NORMS} if two_norms else NAMES,
    )
    return config.model_config(
        name, decoder, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_positions, tie_word_embeddings=True, eos_token_id=11, bos_token_id=11,
    )  # fmt: skip
