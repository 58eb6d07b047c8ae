"""Every PEFT LoRA feature kvrun serves, made by PEFT itself on tiny random models (fp32), served in one mixed batch
with a plain LoRA adapter and base rows: each row's greedy tokens equal HF + PEFT run on that row alone, logprobs
within 1e-4 relative. Each feature runs on Llama and on at least one other family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters_registry import open_store
from kvrun import LLM
from kvrun.runtime.models.manifest import manifest
from kvrun.runtime.models.registry import read_model_config
from tests.adapters.peft_extras import with_trained_magnitudes
from tests.models.families import FAMILIES, PeftSpec, SoloReferences, make_peft_adapter, tiny_checkpoint
from tests.models.test_families import assert_rows_match, generate, rows_for

PLAIN = "plain"


class FeatureModel:
    """A tiny base model of one family with a plain LoRA adapter beside the feature adapters a test adds."""

    def __init__(self, family: str, root: Path, **config) -> None:
        self.family = FAMILIES[family]
        self.root = root
        self.base = tiny_checkpoint(self.family, root / "base", seed=3, **config)
        self.adapters: dict[str, Path] = {}
        self.add(PeftSpec(PLAIN, 8, list(self.family.attention), alpha=16.0))

    def add(self, spec: PeftSpec) -> str:
        self.adapters[spec.name] = make_peft_adapter(self.base, spec, self.root / spec.name, seed=len(self.adapters) + 1)
        return spec.name

    def check_mixed_batch(self, *names: str, max_lora_rank: int = 16, **llm_options) -> None:
        """names and the plain adapter in one engine, two rows each, plus base rows; every row matches HF + PEFT."""
        served = {name: self.adapters[name] for name in (*names, PLAIN)}
        llm = LLM(str(self.base), max_loras=len(served), max_lora_rank=max_lora_rank, num_blocks=96, block_size=4,
                  **llm_options)  # fmt: skip
        try:
            for name, directory in served.items():
                llm.load_adapter(name, directory)
            rows = rows_for(list(served))
            assert_rows_match(generate(llm, rows), rows, SoloReferences(self.base, served))
        finally:
            llm.shutdown()  # tensor-parallel workers stop with it

    def push(self, name: str, registry: Path) -> None:
        """The registry accepts what the engine serves: push against this base model's manifest."""
        config = json.loads((self.base / "config.json").read_text())
        with open_store(f"file://{registry}", token="") as store:
            store.set_base_config("tiny/base", manifest(read_model_config(config, "tiny")))
            assert store.push(self.adapters[name], f"team/{name}", base_model="tiny/base").version == 1


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> FeatureModel:
    return FeatureModel("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> FeatureModel:
    return FeatureModel("qwen2", tmp_path_factory.mktemp("qwen2"))


# -- per-module ranks and alphas ---------------------------------------------------------------------------------------
def _pattern_spec(family) -> PeftSpec:
    """Keys as PEFT reads them: a leaf name, a dotted suffix naming one layer's module, and a regex; the first key
    that matches wins, so the order matters (q_proj of layer 0 takes 12, not 2)."""
    q, k, v = family.attention[:3]
    down = family.mlp[-1]
    rank_pattern = {rf"layers\.0\.self_attn\.{q}": 12, q: 2, k: 3, f"model.layers.1.mlp.{down}": 16}
    alpha_pattern = {v: 5.0, rf"layers\.[01]\.mlp\.{down}": 32.0}
    return PeftSpec("patterns", 4, [q, k, v, down], alpha=8.0,
                    extra={"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern})  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rank_and_alpha_patterns_match_peft(family, request):
    model: FeatureModel = request.getfixturevalue(family)
    name = model.add(_pattern_spec(model.family))
    model.check_mixed_batch(name)


def test_rank_pattern_shapes_are_what_peft_saved(llama):
    from safetensors.torch import load_file

    name = llama.add(_pattern_spec(llama.family))
    tensors = load_file(llama.adapters[name] / "adapter_model.safetensors")
    ranks = {key.split(".lora_A")[0].removeprefix("base_model.model."): t.shape[0] for key, t in tensors.items()
             if ".lora_A." in key}  # fmt: skip
    assert ranks["model.layers.0.self_attn.q_proj"] == 12 and ranks["model.layers.1.self_attn.q_proj"] == 2
    assert ranks["model.layers.1.mlp.down_proj"] == 16 and ranks["model.layers.0.mlp.down_proj"] == 4
    llm = LLM(str(llama.base), max_loras=1, max_lora_rank=16, num_blocks=16, block_size=4)
    parsed = llm.engine.adapters.parse_path(name, llama.adapters[name])
    assert {module: a.shape[0] for module, (a, _) in parsed.weights.items()} == ranks
    assert parsed.scaling("model.layers.0.self_attn.v_proj") == 5.0 / 4
    assert parsed.scaling("model.layers.1.mlp.down_proj") == 32.0 / 16
    assert parsed.scaling("model.layers.0.self_attn.q_proj") == 8.0 / 12


# -- lora_bias -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_bias_matches_peft(family, request, tmp_path):
    """A bias on every lora_B (attention and MLP, one module at its own rank and alpha), beside plain LoRA and base
    rows."""
    model: FeatureModel = request.getfixturevalue(family)
    q = model.family.attention[0]
    targets = [*model.family.attention, *model.family.mlp]
    name = model.add(PeftSpec("lora-bias", 4, targets, alpha=8.0,
                              extra={"lora_bias": True, "rank_pattern": {q: 6}, "alpha_pattern": {q: 3.0}}))  # fmt: skip
    model.check_mixed_batch(name)
    model.push(name, tmp_path / "registry")


# -- DoRA ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_dora_matches_peft(family, request, tmp_path):
    """DoRA on attention and MLP modules (both families' q/k/v carry a base bias, which DoRA leaves unscaled; Llama's
    MLP too), one module at its own rank and alpha, beside plain LoRA and base rows."""
    model: FeatureModel = request.getfixturevalue(family)
    q = model.family.attention[0]
    targets = [*model.family.attention, *model.family.mlp]
    name = model.add(PeftSpec("dora", 4, targets, alpha=8.0,
                              extra={"use_dora": True, "rank_pattern": {q: 6}, "alpha_pattern": {q: 3.0}}))  # fmt: skip
    with_trained_magnitudes(model.base, model.adapters[name], seed=5)
    model.check_mixed_batch(name)
    model.push(name, tmp_path / "registry")


# -- LoRA on the token embedding and the output layer -------------------------------------------------------------------
# case → (family, base config, its token embedding's and output layer's names as PEFT targets them); transformers 5
# names GPT-NeoX's head lm_head, its checkpoint (and adapters trained with transformers 4) embed_out
VOCAB_CASES = {
    "llama": ("llama", {}, "embed_tokens", "lm_head"),
    "gpt_neox": ("gpt_neox", {}, "embed_in", "lm_head"),
    "phi": ("phi", {}, "embed_tokens", "lm_head"),
    "tied_llama": ("llama", {"tie_word_embeddings": True}, "embed_tokens", "lm_head"),
}


@pytest.mark.parametrize("case", list(VOCAB_CASES))
def test_embedding_and_output_layer_lora_match_peft(case, llama, tmp_path_factory, tmp_path):
    """PEFT's embedding LoRA on the token embedding and a linear LoRA on the output layer (at its own rank and alpha),
    with attention LoRA, beside plain LoRA and base rows; PEFT saves both base layers beside them. GPT-NeoX's
    embedding is embed_in, Phi's head has a bias, and with tied embeddings one matrix plays both roles, each with its
    own LoRA."""
    family, config, embedding, head = VOCAB_CASES[case]
    model = llama if case == "llama" else FeatureModel(family, tmp_path_factory.mktemp(case), **config)
    targets = [model.family.attention[0], embedding, head]
    name = model.add(PeftSpec("vocab", 4, targets, alpha=8.0,
                              extra={"rank_pattern": {head: 6}, "alpha_pattern": {head: 3.0}}))  # fmt: skip
    head_only = model.add(PeftSpec("head-only", 2, [head], alpha=4.0))
    model.check_mixed_batch(name, head_only)
    model.push(name, tmp_path / "registry")


def test_a_saved_base_layer_that_differs_from_the_base_model_is_refused(llama, tmp_path):
    """PEFT's load would write the adapter's copy of the embedding into the model: one that differs (a retrained or
    resized vocabulary) is refused by name, not served with the base model's embedding."""
    import shutil

    from safetensors.torch import load_file, save_file

    from kvrun.adapters import AdapterError

    directory = shutil.copytree(llama.adapters[llama.add(PeftSpec("emb", 4, ["embed_tokens"]))], tmp_path / "edited")
    tensors = load_file(directory / "adapter_model.safetensors")
    tensors["base_model.model.model.embed_tokens.base_layer.weight"][5, 0] += 1.0
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    llm = LLM(str(llama.base), max_loras=1, max_lora_rank=8, num_blocks=16, block_size=4)
    with pytest.raises(AdapterError, match=r"model\.embed_tokens\.base_layer\.weight, which differs from the base"):
        llm.load_adapter("edited", directory)
