"""StarCoder2: LayerNorm with biases, biases on every projection, a plain (non-gated) GeLU MLP, sliding window."""

from __future__ import annotations

from kvrun.runtime.attention.base import AttentionVariant
from kvrun.runtime.layers.norm import NormSpec
from kvrun.runtime.models.hf_config import HFConfig
from kvrun.runtime.models.spec import AttentionSpec, DecoderSpec, MLPSpec, ModelConfig

ARCHITECTURES = {"Starcoder2ForCausalLM": "starcoder2"}
EXAMPLE = "bigcode/starcoder2-7b"


def read_config(config: HFConfig, name: str) -> ModelConfig:
    hidden, heads = config.require("hidden_size"), config.require("num_attention_heads")
    kv_heads = config.kv_heads(heads, absent=2)
    head_dim = config.number("head_dim", hidden // heads)
    max_positions = config.number("max_position_embeddings", 4096)
    bias = bool(config.get("use_bias", True))
    attention = AttentionSpec(
        AttentionVariant(head_dim**-0.5, sliding_window=config.get("sliding_window")),
        config.rope(head_dim=head_dim, max_position_embeddings=max_positions),
        qkv_bias=bias,
        o_bias=bias,
    )
    mlp = MLPSpec(
        config.require("intermediate_size"),
        config.activation("hidden_act", default="gelu_pytorch_tanh"),
        gated=False,
        in_slices=("c_fc",),
        out_slice="c_proj",
        bias=bias,
    )
    decoder = DecoderSpec(
        norm=NormSpec("layer", config.number("norm_epsilon", 1e-5, float), bias=True),
        layers=(attention,) * config.require("num_hidden_layers"),
        mlp=mlp,
    )
    return config.model_config(
        name, decoder, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_positions, tie_word_embeddings=True, eos_token_id=50256, bos_token_id=50256,
    )  # fmt: skip
