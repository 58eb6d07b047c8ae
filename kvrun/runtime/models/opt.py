"""OPT and Galactica: learned positions offset by 2, LayerNorm with bias before (or, OPT-350m, after) each block,
plain ReLU MLP (`fc1`, `fc2`) beside the attention, embeddings narrower than the layers behind `project_in` /
`project_out` (both LoRA-targetable, as PEFT's "all-linear" adapts them), tied head."""

from __future__ import annotations

from kvrun.runtime.attention.base import AttentionVariant
from kvrun.runtime.layers.norm import NormSpec
from kvrun.runtime.models.hf_config import HFConfig
from kvrun.runtime.models.spec import AttentionSpec, DecoderSpec, MLPSpec, ModelConfig

ARCHITECTURES = {"OPTForCausalLM": "opt"}
EXAMPLE = "facebook/opt-1.3b, facebook/galactica-1.3b"
POSITION_OFFSET = 2  # OPT's position table keeps two rows before position 0
NAMES = {
    "model": "model.decoder",
    "model.layers.{i}.input_layernorm": "model.decoder.layers.{i}.self_attn_layer_norm",
    "model.layers.{i}.post_attention_layernorm": "model.decoder.layers.{i}.final_layer_norm",
    "model.layers.{i}.mlp": "model.decoder.layers.{i}",
    "model.norm": "model.decoder.final_layer_norm",
}


def read_config(config: HFConfig, name: str) -> ModelConfig:
    hidden, heads = config.require("hidden_size"), config.require("num_attention_heads")
    head_dim = hidden // heads
    max_positions = config.number("max_position_embeddings", 2048)
    config.refuse_if(not config.get("layer_norm_elementwise_affine", True),
                     "layer_norm_elementwise_affine=false (LayerNorm without weights) is not supported")  # fmt: skip
    bias = bool(config.get("enable_bias", True))
    pre_norm = bool(config.get("do_layer_norm_before", True))
    projection = config.get("word_embed_proj_dim") or hidden
    attention = AttentionSpec(AttentionVariant(head_dim**-0.5), None, o_slice="out_proj", qkv_bias=bias, o_bias=bias)
    mlp = MLPSpec(config.require("ffn_dim"), config.activation("activation_function", default="relu"), gated=False,
                  in_slices=("fc1",), out_slice="fc2", bias=bias)  # fmt: skip
    decoder = DecoderSpec(
        norm=NormSpec("layer", 1e-5, bias=True),  # OPT's LayerNorms all keep torch's default eps
        layers=(attention,) * config.require("num_hidden_layers"),
        mlp=mlp,
        block="sequential" if pre_norm else "post_norm",
        final_norm=pre_norm and not config.get("_remove_final_layer_norm", False),
        learned_positions=max_positions + POSITION_OFFSET,
        learned_position_offset=POSITION_OFFSET,
        embedding_projection=projection if projection != hidden else None,
        checkpoint_names=NAMES,
    )
    return config.model_config(
        name, decoder, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
        max_position_embeddings=max_positions, tie_word_embeddings=True, eos_token_id=2, bos_token_id=2,
    )  # fmt: skip
