"""GGUF files of each family load and compute what the HF checkpoint they came from computes.

Each tiny random HF checkpoint is written as llama.cpp writes GGUF (tensor names from the `gguf` package's tables,
Llama/Mistral Q and K rows permuted for llama.cpp's rotary layout, Gemma norms stored as `1 + w`, Baichuan's W_pack
split into Q, K, V with Q and K permuted, the family's metadata keys), then served from the .gguf file; greedy tokens
and logprobs must match the HF directory's, fp32.
Files carrying what kvrun cannot map faithfully are refused by name.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvrun import LLM, SamplingParams
from kvrun.runtime.gguf import GGUFError, convert_gguf
from tests.models.families import FAMILIES, tiny_checkpoint
from tests.models.test_baichuan import _baichuan_checkpoint

gguf = pytest.importorskip("gguf")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Conversions of these throwaway files go to the test's directory, not the user's model cache."""
    monkeypatch.setenv("KVRUN_CACHE", str(tmp_path / "kvrun-cache"))

# family → (GGUF architecture, overrides that keep the tiny config within what GGUF files state)
CASES = {
    "llama": ("llama", dict(attention_bias=False, mlp_bias=False, head_dim=16)),
    "mistral": ("llama", dict(sliding_window=None)),  # llama.cpp writes Mistral as llama, without a window
    "qwen2": ("qwen2", dict(use_sliding_window=False)),
    "qwen3": ("qwen3", dict(attention_bias=False, head_dim=24)),  # head_dim != hidden / heads: key_length says so
    "phi3": ("phi3", dict(rope_scaling=None, partial_rotary_factor=1.0)),
    "starcoder2": ("starcoder2", dict(sliding_window=None)),
    "gemma": ("gemma", {}),
    "cohere": ("command-r", {}),
    "baichuan": ("baichuan", {}),  # built from a Llama checkpoint (see hf_dir_for)
    "gemma2": ("gemma2", dict(query_pre_attn_scalar=16)),
    "gemma3": ("gemma3", dict(sliding_window_pattern=6, rope_scaling=None, rope_local_base_freq=10000.0,
                              query_pre_attn_scalar=16)),
}  # fmt: skip
PERMUTED = {"llama", "baichuan"}  # llama.cpp interleaves Q/K rows for these architectures
PLUS_ONE_NORMS = {"gemma", "gemma2", "gemma3"}


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_gguf(hf_dir, family: str, out_path, extra_metadata: dict | None = None, extra_tensors: dict | None = None,
               tokens: list[str] | None = None):
    """Write hf_dir as llama.cpp's converter would (metadata, names, transforms); a sentencepiece vocabulary of
    `tokens` (ids 0-2: unknown, bos, eos) or no tokenizer."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, LlamaConfig

    arch_name, _ = CASES[family]
    # Baichuan's config.json names remote code, which is never run: its keys are Llama's
    config = LlamaConfig.from_pretrained(hf_dir) if family == "baichuan" else AutoConfig.from_pretrained(hf_dir)
    arch = gguf.MODEL_ARCH[arch_name.upper().replace("-", "_")]
    writer = gguf.GGUFWriter(str(out_path), arch_name)
    writer.add_name("tiny-mistral" if family == "mistral" else f"tiny-{family}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(int(head_dim * (getattr(config, "partial_rotary_factor", None) or 1.0)))
    if family == "baichuan":  # llama.cpp states Baichuan's layout, and no rope base (Baichuan's code fixes it)
        writer.add_tensor_data_layout("Meta AI original pth")
    else:
        rope = config.rope_parameters or {}
        theta = rope["rope_theta"] if "rope_theta" in rope else rope["full_attention"]["rope_theta"]
        writer.add_rope_freq_base(float(theta))
    if family in ("starcoder2", "cohere"):
        writer.add_layer_norm_eps(config.norm_epsilon if family == "starcoder2" else config.layer_norm_eps)
    else:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if family == "cohere":
        writer.add_logit_scale(config.logit_scale)
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    if family in ("qwen3", "gemma", "gemma2", "gemma3"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if family in ("gemma2", "gemma3"):
        writer.add_sliding_window(config.sliding_window)
    if family == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if tokens:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores([0.0] * len(tokens))
        writer.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    for key, value in (extra_metadata or {}).items():
        writer.add_float32(key, value) if isinstance(value, float) else writer.add_string(key, value)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    for name in [name for name in tensors if ".W_pack." in name]:  # llama.cpp splits Baichuan's W_pack
        for leaf, part in zip(("q_proj", "k_proj", "v_proj"), tensors.pop(name).chunk(3)):
            tensors[name.replace("W_pack", leaf)] = part
    for name, tensor in tensors.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        stem, suffix = name.rsplit(".", 1)
        target = names.get_name(stem)
        assert target is not None, f"no GGUF name for {name}"
        if arch_name in PERMUTED and stem.endswith(("q_proj", "k_proj")) and suffix == "weight":
            heads = config.num_attention_heads if stem.endswith("q_proj") else config.num_key_value_heads
            tensor = _permute(tensor, heads)
        if family in PLUS_ONE_NORMS and stem.endswith("norm") and suffix == "weight":
            tensor = tensor + 1
        writer.add_tensor(f"{target}.{suffix}", tensor.float().numpy())
    for name, values in (extra_tensors or {}).items():
        writer.add_tensor(name, np.asarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def hf_dir_for(family: str, root, **more):
    if family == "baichuan":
        llama = tiny_checkpoint(FAMILIES["llama"], root / "llama", seed=3, num_key_value_heads=4,
                                attention_bias=False, mlp_bias=False, **more)  # fmt: skip
        _baichuan_checkpoint(llama, root / "hf")
        return root / "hf"
    _, overrides = CASES[family]
    spec = FAMILIES[family]
    spec = type(spec)(spec.name, spec.config_class, {**spec.overrides, **overrides, **more}, spec.attention, spec.mlp)
    return tiny_checkpoint(spec, root / "hf", seed=3)


LINEAR_ROPE = {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("family, scaled", [*((f, False) for f in sorted(CASES)), ("llama", True), ("gemma3", True)])
def test_gguf_of_each_family_matches_its_hf_checkpoint(family, scaled, tmp_path):
    """`scaled`: linear rope scaling, stated by GGUF's rope.scaling keys (Gemma 3 applies it to its global layers)."""
    more = dict(rope_scaling=LINEAR_ROPE) if scaled else {}
    if family == "gemma3":
        more["num_hidden_layers"] = 6  # Gemma 3's sixth layer is its first global one (GGUF states no pattern)
    hf = hf_dir_for(family, tmp_path, **more)
    arch = CASES[family][0]
    scaling = {f"{arch}.rope.scaling.type": "linear", f"{arch}.rope.scaling.factor": 2.0} if scaled else None
    path = write_gguf(hf, family, tmp_path / f"tiny-{family}.gguf", extra_metadata=scaling)
    params = SamplingParams(max_tokens=5, temperature=0.0, logprobs=3, ignore_eos=True)
    prompts = [[5, 9, 17, 33, 4, 8, 100, 7, 9, 11, 3], [70, 71, 72]]
    want = LLM(str(hf)).generate(prompts, params)
    got = LLM(str(path)).generate(prompts, params)
    for ours, theirs in zip(got, want):
        assert ours.token_ids == theirs.token_ids
        for step, values in enumerate(theirs.logprobs):
            for token, value in values.items():
                assert abs(ours.logprobs[step][token] - value) <= 1e-4 * max(1.0, abs(value)), (family, step, token)


def test_gguf_rope_factor_tensors_are_refused_by_name(tmp_path):
    hf = hf_dir_for("llama", tmp_path)
    path = write_gguf(hf, "llama", tmp_path / "rope.gguf", extra_tensors={"rope_freqs.weight": np.ones(8)})
    with pytest.raises(GGUFError, match="rope_freqs"):
        convert_gguf(path, tmp_path / "out")


def test_gguf_unknown_math_key_is_refused_by_name(tmp_path):
    hf = hf_dir_for("qwen2", tmp_path)
    path = write_gguf(hf, "qwen2", tmp_path / "key.gguf", extra_metadata={"qwen2.attention.temperature_scale": 0.5})
    with pytest.raises(GGUFError, match="qwen2.attention.temperature_scale"):
        convert_gguf(path, tmp_path / "out")


@pytest.mark.parametrize("family", ["gemma", "cohere", "baichuan"])
def test_gguf_unknown_key_of_a_family_kvrun_reads_itself_is_refused_by_name(family, tmp_path):
    key = f"{CASES[family][0]}.attention.temperature_scale"
    path = write_gguf(hf_dir_for(family, tmp_path), family, tmp_path / "key.gguf", extra_metadata={key: 0.5})
    with pytest.raises(GGUFError, match=key):
        convert_gguf(path, tmp_path / "out")


@pytest.mark.parametrize("family", ["gemma", "cohere", "baichuan"])
def test_gguf_tokenizer_of_a_family_kvrun_reads_itself_is_kept(family, tmp_path):
    from transformers import AutoTokenizer

    tokens = ["<unk>", "<s>", "</s>", "\u2581", *"abcdefgh"]
    path = write_gguf(hf_dir_for(family, tmp_path), family, tmp_path / "tok.gguf", tokens=tokens)
    convert_gguf(path, tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tokenizer("ab ca").input_ids
    assert ids[0] == 1 and all(3 <= token < len(tokens) for token in ids[1:])
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab ca"


def test_gguf_tensor_kvrun_has_no_place_for_is_refused_by_name(tmp_path):
    path = write_gguf(hf_dir_for("gemma", tmp_path), "gemma", tmp_path / "extra.gguf",
                      extra_tensors={"blk.0.attn_k_norm.weight": np.ones(16)})  # fmt: skip
    with pytest.raises(GGUFError, match="blk.0.attn_k_norm.weight"):
        convert_gguf(path, tmp_path / "out")


def test_gguf_of_an_unsupported_architecture_names_it(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="'mamba' is not supported.*llama"):
        convert_gguf(tmp_path / "mamba.gguf", tmp_path / "out")
