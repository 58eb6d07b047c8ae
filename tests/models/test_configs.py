"""Config reading: every Llama variant HF computes differently is computed as HF does (in both config styles), and
what kvrun cannot compute is refused by name — never run as something else."""

from __future__ import annotations

import json

import pytest
import torch

from kvrun import LLM
from kvrun.runtime.models.hf_config import ModelConfigError
from kvrun.runtime.models.registry import read_model_config, supported_architectures
from tests.models.families import FAMILIES, CachedReference, tiny_checkpoint
from tests.models.test_families import assert_rows_match, generate, rows_for

ROPE_STYLES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 16.0},
}  # fmt: skip


def _transformers4_style(base_dir, rope: dict) -> None:
    """Rewrite config.json as transformers 4 wrote it: rope_theta beside a `rope_scaling` dict with "type"."""
    path = base_dir / "config.json"
    config = json.loads(path.read_text())
    config.pop("rope_parameters", None)
    scaling = {("type" if key == "rope_type" else key): value for key, value in rope.items()}
    config.update(rope_theta=10000.0, rope_scaling=scaling)
    path.write_text(json.dumps(config))


def _check_base_parity(base_dir) -> None:
    llm = LLM(str(base_dir), max_loras=0, num_blocks=96, block_size=4)
    rows = rows_for([None, None], seed=5)
    assert_rows_match(generate(llm, rows), rows, CachedReference(base_dir, {}))


@pytest.mark.parametrize("style", ["transformers5", "transformers4"])
@pytest.mark.parametrize("kind", sorted(ROPE_STYLES))
def test_llama_rope_scaling_matches_hf(kind, style, tmp_path):
    rope = ROPE_STYLES[kind]
    # A short trained context (linear/dynamic stretch it by their factor; llama3/yarn name the original length in
    # their parameters), so the rows run past it and the scaling matters.
    max_positions = 16 if kind in ("linear", "dynamic") else 64
    base = tiny_checkpoint(FAMILIES["llama"], tmp_path / "base", seed=9, max_position_embeddings=max_positions,
                           rope_parameters={**rope, "rope_theta": 10000.0})  # fmt: skip
    if style == "transformers4":
        _transformers4_style(base, rope)
    config = json.loads((base / "config.json").read_text())
    assert ("rope_scaling" in config) == (style == "transformers4")
    _check_base_parity(base)


def test_llama_hidden_act_is_honoured(tmp_path):
    base = tiny_checkpoint(FAMILIES["llama"], tmp_path / "base", seed=4, hidden_act="gelu")
    _check_base_parity(base)


def test_gemma_config_without_architectures_is_read_as_gemma(tmp_path):
    base = tiny_checkpoint(FAMILIES["gemma"], tmp_path / "base", seed=2)
    path = base / "config.json"
    config = json.loads(path.read_text())
    del config["architectures"]
    path.write_text(json.dumps(config))
    assert read_model_config(config, "x").architecture == "GemmaForCausalLM"
    _check_base_parity(base)


LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32, "hidden_size": 16,
         "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}  # fmt: skip

REFUSED = {
    "unknown architecture": ({"architectures": ["MambaForCausalLM"]}, "'MambaForCausalLM' is not supported"),
    "gpt2 cross-attention": ({"architectures": ["GPT2LMHeadModel"], "n_embd": 16, "n_head": 2, "n_layer": 1,
                              "vocab_size": 8, "add_cross_attention": True}, "cross-attention"),
    "missing key": ({**LLAMA, "hidden_size": None}, "no 'hidden_size'"),
    "unknown rope type": ({**LLAMA, "rope_scaling": {"type": "mrope", "factor": 2}}, "rope type 'mrope'"),
    "rope without its factor": ({**LLAMA, "rope_scaling": {"rope_type": "linear"}}, "needs 'factor'"),
    "unknown activation": ({**LLAMA, "hidden_act": "relu6"}, "hidden_act='relu6' is not supported"),
    "architecture and model_type disagree": ({**LLAMA, "model_type": "gemma"}, "model_type 'gemma'"),
    "no architecture, unknown type": ({"model_type": "t5", "d_model": 16}, "model_type 't5'"),
    "wrong type": ({**LLAMA, "num_hidden_layers": "2"}, "must be int"),
    "bad head split": ({**LLAMA, "num_key_value_heads": 3, "num_attention_heads": 4}, "not a multiple"),
    "Gemma 3 bidirectional": ({**LLAMA, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
                               "use_bidirectional_attention": True}, "use_bidirectional_attention"),
    "Baichuan 13B (ALiBi)": ({**LLAMA, "architectures": ["BaichuanForCausalLM"], "model_type": "baichuan",
                             "hidden_size": 5120, "num_hidden_layers": 40}, "ALiBi"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_kvrun_cannot_compute_is_refused_by_name(case):
    config, message = REFUSED[case]
    with pytest.raises(ModelConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_model_config(config, "x")


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(ModelConfigError) as error:
        read_model_config({"architectures": ["RwkvForCausalLM"]}, "x")
    for architecture in supported_architectures():
        assert architecture in str(error.value)


def test_longrope_prompts_rotate_by_their_whole_length_when_chunked_or_cached(tmp_path):
    """Phi-3's LongRoPE uses its long factors for a whole prompt longer than the original context (16 here), as HF
    computes it in one forward pass. A prompt run in 8-token chunks must rotate every chunk by the prompt's length, and
    the prefix cache must not hand a long prompt the blocks a short prompt computed with the short factors (nor the
    other way round); two long prompts still share."""
    base = tiny_checkpoint(FAMILIES["phi3"], tmp_path / "base", seed=9)
    generator = torch.Generator().manual_seed(2)
    long = torch.randint(3, 250, (40,), generator=generator).tolist()
    short, longer = long[:12] + [7, 9], long[:36] + [5, 6, 8, 11, 13]
    reference = CachedReference(base, {})
    chunked = LLM(str(base), max_loras=0, num_blocks=96, block_size=4, max_num_batched_tokens=8, max_num_seqs=4,
                  enable_prefix_caching=False)  # fmt: skip
    assert_rows_match(generate(chunked, [(long, None)]), [(long, None)], reference)
    for order in ([short, long, longer], [long, short, longer]):
        cached = LLM(str(base), max_loras=0, num_blocks=96, block_size=4, enable_chunked_prefill=False)
        for prompt in order:
            assert_rows_match(generate(cached, [(prompt, None)]), [(prompt, None)], reference)
        # Only `longer` hits: the 36 tokens it shares with `long` (9 blocks); `short` shares blocks with neither.
        assert cached.engine.scheduler.stats.prefix_cache_hits == 36


def test_a_preempted_longrope_request_recomputes_the_rotation_it_had(tmp_path):
    """A 12-token prompt decodes past Phi-3's original context (16): its prompt rotated by the prompt's length, each
    later token by its own. Preempted after 7 tokens and recomputed from scratch (prefix cache off), every token
    must rotate as it first did, so the rest equals the run without preemption."""
    from kvrun import SamplingParams

    base = tiny_checkpoint(FAMILIES["phi3"], tmp_path / "base", seed=9)
    prompt = list(range(20, 32))
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=0)
    llm = LLM(str(base), max_loras=0, num_blocks=96, block_size=4, enable_prefix_caching=False)
    (solo,) = llm.generate([prompt], params)
    engine = llm.engine
    request = engine.add_request(prompt, params)
    while len(request.output_token_ids) < 7:
        engine.step()
    engine.scheduler.preempt(request)
    while engine.has_unfinished():
        engine.step()
    assert request.num_preemptions == 1 and request.output_token_ids == solo.token_ids
    for got, want in zip(request.logprobs, solo.logprobs):
        assert got.keys() == want.keys() and all(abs(got[t] - want[t]) < 1e-4 for t in got)


def test_yarn_scaling_extends_the_context_by_its_factor(tmp_path):
    """Qwen2.5's long-context recipe: YaRN x4 on top of 32k positions serves 128k (as vLLM derives it); linear and
    dynamic stretch the positions likewise. A context longer than that is refused with both lengths."""
    base = tiny_checkpoint(FAMILIES["llama"], tmp_path / "base", seed=9, max_position_embeddings=32,
                           rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                            "rope_theta": 10000.0})  # fmt: skip
    config = json.loads((base / "config.json").read_text())
    assert read_model_config(config, "x").max_position_embeddings == 128
    assert LLM(str(base), max_loras=0, num_blocks=64, block_size=4, max_model_len=128).engine.max_model_len == 128
    with pytest.raises(ValueError, match="max_model_len 129 is longer than the model's context: 128 positions"):
        LLM(str(base), max_loras=0, num_blocks=64, block_size=4, max_model_len=129)
