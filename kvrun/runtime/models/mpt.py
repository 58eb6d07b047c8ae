"""MPT (MosaicML): ALiBi, q/k/v fused as `Wqkv` (q | k | v) and optionally clamped (`clip_qkv`), LayerNorm without
bias, no projection biases, exact-GeLU MLP (`up_proj`, `down_proj`), tied head. Settings HF's MPT does not compute
(learned positions instead of ALiBi, q/k LayerNorm, prefix LM, multi-query) are refused by name."""

from __future__ import annotations

import math

from kvrun.runtime.attention.base import AttentionVariant
from kvrun.runtime.layers.norm import NormSpec
from kvrun.runtime.models.hf_config import HFConfig
from kvrun.runtime.models.spec import AttentionSpec, DecoderSpec, MLPSpec, ModelConfig

ARCHITECTURES = {"MptForCausalLM": "mpt"}
EXAMPLE = "mosaicml/mpt-7b-instruct"
NAMES = {
    "model": "transformer",
    "model.embed_tokens": "transformer.wte",
    "model.layers.{i}": "transformer.blocks.{i}",
    "model.layers.{i}.input_layernorm": "transformer.blocks.{i}.norm_1",
    "model.layers.{i}.self_attn": "transformer.blocks.{i}.attn",
    "model.layers.{i}.post_attention_layernorm": "transformer.blocks.{i}.norm_2",
    "model.layers.{i}.mlp": "transformer.blocks.{i}.ffn",
    "model.norm": "transformer.norm_f",
}
KEYS = {"num_attention_heads": "n_heads", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_seq_len"}  # fmt: skip


def read_config(config: HFConfig, name: str) -> ModelConfig:
    config.rename_keys(KEYS)
    hidden, heads = config.require("hidden_size"), config.require("num_attention_heads")
    head_dim = hidden // heads
    attn = config.get("attn_config") or {}
    config.refuse_if(not isinstance(attn, dict), f"attn_config must be an object, got {attn!r}")
    for key, off in (("alibi", True), ("qk_ln", False), ("prefix_lm", False), ("attn_uses_sequence_id", False)):
        config.refuse_if(bool(attn.get(key, off)) != off, f"attn_config.{key}={attn.get(key)!r} is not supported")
    config.refuse_if(attn.get("attn_type", "multihead_attention") != "multihead_attention",
                     f"attn_config.attn_type={attn.get('attn_type')!r} is not supported")  # fmt: skip
    # kvrun's ALiBi slopes (and FlashInfer's) are MPT's for a power-of-two head count and alibi_bias_max 8.
    config.refuse_if(attn.get("alibi_bias_max", 8) != 8 or heads != 2 ** round(math.log2(heads)),
                     "ALiBi slopes other than alibi_bias_max=8 over a power-of-two head count are not supported")  # fmt: skip
    config.refuse_if(config.get("logit_scale") is not None, "logit_scale is not supported")
    scale = attn.get("softmax_scale") or head_dim**-0.5
    clip = attn.get("clip_qkv")
    attention = AttentionSpec(
        AttentionVariant(float(scale), alibi=True), None, qkv_slices=("Wqkv",), o_slice="out_proj",
        clip_qkv=float(clip) if clip else None,
    )  # fmt: skip
    mlp = MLPSpec(config.number("expansion_ratio", 4) * hidden, "gelu", gated=False, in_slices=("up_proj",))
    decoder = DecoderSpec(
        norm=NormSpec("layer", config.number("layer_norm_epsilon", 1e-5, float)),
        layers=(attention,) * config.require("num_hidden_layers"),
        mlp=mlp,
        checkpoint_names=NAMES,
    )
    return config.model_config(
        name, decoder, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
        max_position_embeddings=config.number("max_position_embeddings", 2048), tie_word_embeddings=True,
        eos_token_id=None, bos_token_id=None,
    )  # fmt: skip
