"""BLOOM / BLOOMZ: ALiBi position biases, q/k/v fused per head in `query_key_value`, a LayerNorm right after the
embeddings, LayerNorm with bias, biases on every projection, tanh-GeLU MLP, tied head."""

from __future__ import annotations

from kvrun.runtime.attention.base import AttentionVariant
from kvrun.runtime.layers.norm import NormSpec
from kvrun.runtime.models.falcon import NAMES as FALCON_NAMES
from kvrun.runtime.models.hf_config import HFConfig
from kvrun.runtime.models.spec import AttentionSpec, DecoderSpec, MLPSpec, ModelConfig

ARCHITECTURES = {"BloomForCausalLM": "bloom"}
EXAMPLE = "bigscience/bloomz-560m"
NAMES = {**FALCON_NAMES, "model.embed_norm": "transformer.word_embeddings_layernorm"}  # Falcon kept Bloom's names
KEYS = {"num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}
MAX_POSITIONS = 2048  # Bloom's training length; ALiBi sets no hard limit, so kvrun serves what it was trained for


def read_config(config: HFConfig, name: str) -> ModelConfig:
    config.rename_keys(KEYS)
    hidden, heads = config.require("hidden_size"), config.require("num_attention_heads")
    head_dim = hidden // heads
    config.refuse_if(bool(config.get("apply_residual_connection_post_layernorm", False)),
                     "apply_residual_connection_post_layernorm=true is not supported")  # fmt: skip
    max_positions = config.number("seq_length", MAX_POSITIONS)
    attention = AttentionSpec(
        AttentionVariant(head_dim**-0.5, alibi=True), None, qkv_slices=("query_key_value",), o_slice="dense",
        qkv_layout="grouped", qkv_bias=True, o_bias=True,
    )  # fmt: skip
    # Bloom's GeLU is the tanh approximation written as gelu_fast writes it.
    mlp = MLPSpec(4 * hidden, "gelu_fast", gated=False, in_slices=("dense_h_to_4h",), out_slice="dense_4h_to_h",
                  bias=True)  # fmt: skip
    norm = NormSpec("layer", config.number("layer_norm_epsilon", 1e-5, float), bias=True)
    decoder = DecoderSpec(
        norm=norm,
        layers=(attention,) * config.require("num_hidden_layers"),
        mlp=mlp,
        embedding_norm=norm,
        checkpoint_names=NAMES,
    )
    return config.model_config(
        name, decoder, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
        max_position_embeddings=max_positions, tie_word_embeddings=True, eos_token_id=2, bos_token_id=1,
    )  # fmt: skip
