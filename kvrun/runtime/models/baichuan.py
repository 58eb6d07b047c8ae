"""Baichuan 2 (7B layout): Llama's layers with q/k/v fused as W_pack and Baichuan 2's normalised lm_head.

Baichuan ships its model code beside the checkpoint; kvrun reads config.json alone and never runs that code.
"""

from __future__ import annotations

from kvrun.runtime.attention.base import AttentionVariant
from kvrun.runtime.layers.norm import NormSpec
from kvrun.runtime.models.hf_config import HFConfig
from kvrun.runtime.models.spec import AttentionSpec, DecoderSpec, MLPSpec, ModelConfig

ARCHITECTURES = {"BaichuanForCausalLM": "baichuan"}
EXAMPLE = "baichuan-inc/Baichuan2-7B-Chat"
BAICHUAN1_VOCAB = 64000  # Baichuan (1) 13B: same class name, plain lm_head, ALiBi


def read_config(config: HFConfig, name: str) -> ModelConfig:
    hidden, heads = config.require("hidden_size"), config.require("num_attention_heads")
    vocab = config.require("vocab_size")
    # Baichuan's own code picks ALiBi for its 13B layout (5120 wide, 40 layers) and RoPE otherwise.
    config.refuse_if(
        hidden == 5120 and config.get("num_hidden_layers") == 40,
        "the Baichuan 13B layout uses ALiBi position biases, which kvrun does not compute yet",
    )
    head_dim = hidden // heads
    max_positions = config.get("max_position_embeddings") or config.number("model_max_length", 4096)
    attention = AttentionSpec(
        AttentionVariant(head_dim**-0.5),
        config.rope(head_dim=head_dim, max_position_embeddings=max_positions),
        qkv_slices=("W_pack",),
    )
    decoder = DecoderSpec(
        norm=NormSpec("rms", config.number("rms_norm_eps", 1e-6, float)),
        layers=(attention,) * config.require("num_hidden_layers"),
        mlp=MLPSpec(config.require("intermediate_size"), config.activation("hidden_act", default="silu")),
        normalized_lm_head=vocab != BAICHUAN1_VOCAB,
    )
    return config.model_config(
        name, decoder, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
        max_position_embeddings=max_positions, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1,
    )  # fmt: skip
