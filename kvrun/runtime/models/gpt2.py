"""GPT-2 (and DistilGPT2, DialoGPT, ...): learned absolute positions, `Conv1D` projections stored [in, out], q/k/v
fused as `c_attn`, LayerNorm with bias, plain "gelu_new" MLP, tied head. PEFT adapters on its Conv1D modules carry
`fan_in_fan_out=True`, which only describes the base weight's layout: their lora_A/lora_B are stored as for Linear."""

from __future__ import annotations

from kvrun.runtime.attention.base import AttentionVariant
from kvrun.runtime.layers.norm import NormSpec
from kvrun.runtime.models.hf_config import HFConfig
from kvrun.runtime.models.spec import AttentionSpec, DecoderSpec, MLPSpec, ModelConfig

ARCHITECTURES = {"GPT2LMHeadModel": "gpt2"}
EXAMPLE = "openai-community/gpt2-medium"
NAMES = {
    "model": "transformer",
    "model.embed_tokens": "transformer.wte",
    "model.embed_positions": "transformer.wpe",
    "model.layers.{i}": "transformer.h.{i}",
    "model.layers.{i}.input_layernorm": "transformer.h.{i}.ln_1",
    "model.layers.{i}.self_attn": "transformer.h.{i}.attn",
    "model.layers.{i}.post_attention_layernorm": "transformer.h.{i}.ln_2",
    "model.norm": "transformer.ln_f",
}
KEYS = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions", "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer"}  # fmt: skip


def read_config(config: HFConfig, name: str) -> ModelConfig:
    return read_gpt2_layout(config, name, conv1d=True, default_activation="gelu_new")


def read_gpt2_layout(
    config: HFConfig, name: str, *, conv1d: bool, default_activation: str, multi_query: bool = False
) -> ModelConfig:
    """GPT-2's layout, shared with GPT-BigCode (Linear weights, multi-query or per-head fused q/k/v)."""
    config.rename_keys(KEYS)
    hidden, heads = config.require("hidden_size"), config.require("num_attention_heads")
    head_dim = hidden // heads
    max_positions = config.number("max_position_embeddings", 1024)
    config.refuse_if(bool(config.get("add_cross_attention")), "cross-attention layers are not supported")
    # reorder_and_upcast_attn (GPT-2) and attention_softmax_in_fp32 (BigCode) only move a rounding point: kvrun's
    # attention accumulates in fp32.
    scale = head_dim**-0.5 if config.get("scale_attn_weights", True) else 1.0
    by_layer = bool(config.get("scale_attn_by_inverse_layer_idx", False))
    layout = "split" if multi_query or conv1d else "grouped"  # BigCode without multi_query fuses q/k/v per head
    layers = tuple(
        AttentionSpec(AttentionVariant(scale / (index + 1) if by_layer else scale), None, qkv_slices=("c_attn",),
                      o_slice="c_proj", qkv_layout=layout, qkv_bias=True, o_bias=True)  # fmt: skip
        for index in range(config.require("num_hidden_layers"))
    )
    mlp = MLPSpec(config.get("n_inner") or 4 * hidden,
                  config.activation("activation_function", default=default_activation),
                  gated=False, in_slices=("c_fc",), out_slice="c_proj", bias=True)  # fmt: skip
    decoder = DecoderSpec(
        norm=NormSpec("layer", config.number("layer_norm_epsilon", 1e-5, float), bias=True),
        layers=layers,
        mlp=mlp,
        learned_positions=max_positions,
        transposed_weights=conv1d,
        checkpoint_names=NAMES,
    )
    return config.model_config(
        name, decoder, num_heads=heads, num_kv_heads=1 if multi_query else heads, head_dim=head_dim,
        max_position_embeddings=max_positions, tie_word_embeddings=True, eos_token_id=50256, bos_token_id=50256,
    )  # fmt: skip
