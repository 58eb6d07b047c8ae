"""The classic families' variants beyond the default configs of tests/models/families.py: each one computed as HF
computes it (base rows, fp32, greedy tokens identical and logprobs within 1e-4 relative), and the checkpoint-name
mapping the non-Llama families rely on."""

from __future__ import annotations

import json

import pytest
import torch

from adapters_registry.peft_config import check_config
from kvrun.runtime.models.decoder import checkpoint_path
from kvrun.runtime.models.hf_config import ModelConfigError
from kvrun.runtime.models.registry import read_model_config
from tests.models.families import FAMILIES, PeftSpec, make_peft_adapter, tiny_checkpoint
from tests.models.test_configs import _check_base_parity


def test_checkpoint_path_takes_the_longest_prefix():
    names = {"model": "transformer", "model.layers.{i}": "transformer.h.{i}",
             "model.layers.{i}.self_attn": "transformer.h.{i}.attn", "lm_head": "embed_out"}  # fmt: skip
    assert checkpoint_path("model.layers.12.self_attn.c_attn", names) == "transformer.h.12.attn.c_attn"
    assert checkpoint_path("model.layers.3.mlp.c_fc.weight", names) == "transformer.h.3.mlp.c_fc.weight"
    assert checkpoint_path("model.norm.weight", names) == "transformer.norm.weight"
    assert checkpoint_path("lm_head.weight", names) == "embed_out.weight"
    assert checkpoint_path("model.layers.0.self_attn_norm", names) == "transformer.h.0.self_attn_norm"  # whole parts
    assert checkpoint_path("model.layers.0.x", {}) == "model.layers.0.x"


def test_gpt2_conv1d_adapters_carry_fan_in_fan_out_and_are_accepted(tmp_path):
    base = tiny_checkpoint(FAMILIES["gpt2"], tmp_path / "base", seed=2, n_inner=96)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        adapter = make_peft_adapter(base, PeftSpec("conv1d", 4, ["c_attn", "c_fc"]), tmp_path / "adapter", seed=1)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    assert check_config(config, max_rank=16).rank == 4


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("gpt_neox", dict(use_parallel_residual=False, attention_bias=False, rotary_pct=1.0)),
        ("gpt2", dict(scale_attn_by_inverse_layer_idx=True, activation_function="gelu", n_inner=96)),
        ("opt", dict(do_layer_norm_before=False, ffn_dim=96, enable_bias=False)),  # OPT-350m: norms after blocks
        ("phi", dict(qk_layernorm=False, partial_rotary_factor=0.5)),
        ("gpt_bigcode", dict(multi_query=False, n_inner=96)),  # q/k/v fused per head
        ("falcon", dict(new_decoder_architecture=False, multi_query=True, ffn_hidden_size=96)),  # 7B: MQA, one norm
        ("falcon", dict(new_decoder_architecture=False, multi_query=False, parallel_attn=False, num_kv_heads=4,
                        ffn_hidden_size=96)),
        ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1, ffn_hidden_size=96)),
    ],
)
def test_variants_match_hf(family, overrides, tmp_path):
    base = tiny_checkpoint(FAMILIES[family], tmp_path / "base", seed=5, **overrides)
    _check_base_parity(base)


REFUSED = {
    "falcon alibi": ("FalconForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                                              vocab_size=8, alibi=True), "ALiBi variant"),
    "mpt learned positions": ("MptForCausalLM", dict(d_model=64, n_heads=4, n_layers=1, vocab_size=8,
                                                     attn_config={"alibi": False}), "attn_config.alibi"),
    "mpt slopes": ("MptForCausalLM", dict(d_model=60, n_heads=6, n_layers=1, vocab_size=8), "power-of-two"),
    "bloom post-norm residual": ("BloomForCausalLM", dict(hidden_size=64, n_head=4, n_layer=1, vocab_size=8,
                                 apply_residual_connection_post_layernorm=True), "apply_residual_connection"),
    "opt without norm weights": ("OPTForCausalLM", dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                                 vocab_size=8, ffn_dim=8, layer_norm_elementwise_affine=False), "elementwise_affine"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_the_classic_families_cannot_compute_is_refused_by_name(case):
    architecture, config, message = REFUSED[case]
    with pytest.raises(ModelConfigError, match=message):
        read_model_config({"architectures": [architecture], **config}, "x")


def test_checkpoints_saved_from_the_base_model_load_without_its_prefix(tmp_path):
    """openai-community/gpt2 and bigscience/bloom-560m name their tensors `h.0...`, `wte.weight` (saved from
    GPT2Model / BloomModel) and may carry the old causal-mask buffers."""
    from safetensors.torch import load_file, save_file

    from kvrun import LLM
    from tests.models.families import CachedReference
    from tests.models.test_families import assert_rows_match, generate, rows_for

    base = tiny_checkpoint(FAMILIES["gpt2"], tmp_path / "base", seed=8, n_inner=96)
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    tensors = load_file(base / "model.safetensors")
    renamed = {name.removeprefix("transformer."): tensor for name, tensor in tensors.items()}
    renamed["h.0.attn.bias"] = torch.ones(1, 1, 8, 8)
    save_file(renamed, stripped / "model.safetensors")
    (stripped / "config.json").write_text((base / "config.json").read_text())
    assert not any(name.startswith("transformer.") for name in renamed)
    llm = LLM(str(stripped), max_loras=0, num_blocks=96, block_size=4)
    rows = rows_for([None, None], seed=3)
    assert_rows_match(generate(llm, rows), rows, CachedReference(base, {}))
