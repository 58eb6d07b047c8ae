"""Merged adapters (LoRAX's `merged_adapters`) equal what PEFT computes: `linear` equals PEFT's exact `cat`
combination and `ties` PEFT's `add_weighted_adapter`, as HF + PEFT runs them row by row in a mixed batch with base
rows and plain adapters; `dare_*` equal peft.utils.merge_utils seeded as kvrun documents."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from peft.utils import merge_utils
from safetensors.torch import load

from kvrun import LLM
from kvrun.adapters.merge import MergeError, MergeSpec, dare_seed, merge_adapters, merge_identity
from kvrun.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, load_peft_adapter, parse_adapter
from kvrun.runtime.loader import read_config
from kvrun.runtime.models.registry import read_model_config
from tests.engine.test_parity import _rows, assert_matches_reference, generate_rows
from tests.factories import AdapterSpec, HFReference, make_adapter

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Same rank as the fixture's all-r8, so ties / dare can merge them factor by factor; qv-r8 leaves most modules out.
EXTRA = (AdapterSpec("all-r8b", 8, ALL, alpha=8.0), AdapterSpec("qv-r8", 8, ("q_proj", "v_proj"), alpha=32.0))


@pytest.fixture(scope="module")
def adapters(tiny_gqa, tmp_path_factory):
    base, dirs = tiny_gqa
    root = tmp_path_factory.mktemp("merge")
    extra = {spec.name: make_adapter(base, spec, root / spec.name, seed=40 + i) for i, spec in enumerate(EXTRA)}
    return base, {**dirs, **extra}


def _model_config(base):
    return read_model_config(read_config(base), "tiny")


def _parsed(base, dirs, names):
    return [load_peft_adapter(dirs[name], name, _model_config(base), 64, torch.float32) for name in names]


def test_linear_and_ties_match_hf_peft_in_a_mixed_batch(adapters):
    base, dirs = adapters
    merges = {  # name → (components, weights, combination_type, density, majority_sign_method)
        "cat-mix": (["attn-r4", "all-r8", "mlp-r16-rs"], [0.7, -0.4, 1.3], "linear", 1.0, "total"),
        "ties-total": (["all-r8", "all-r8b", "qv-r8"], [1.0, 0.6, -0.5], "ties", 0.5, "total"),
        "ties-freq": (["all-r8", "all-r8b", "qv-r8"], [0.8, 1.2, 0.9], "ties", 0.3, "frequency"),
    }
    reference = HFReference(base, {name: dirs[name] for name in ("attn-r4", "all-r8", "mlp-r16-rs", "all-r8b",
                                                                  "qv-r8", "ko-r2-half")})  # fmt: skip
    llm = LLM(str(base), max_lora_rank=32, max_loras=4, num_blocks=64, block_size=4)
    for name in reference.adapters:
        llm.load_adapter(name, dirs[name])
    for name, (ids, weights, strategy, density, sign) in merges.items():
        peft_type = "cat" if strategy == "linear" else strategy  # PEFT's exact sum of deltas is "cat"
        reference.model.add_weighted_adapter(ids, weights, name, combination_type=peft_type, density=density,
                                             majority_sign_method=sign)  # fmt: skip
        llm.merge_adapters(name, ids, weights, strategy, density, sign)
    rows = _rows([*merges, "ko-r2-half"])
    assert_matches_reference(generate_rows(llm, rows), rows, reference)


def _factors(files):
    tensors = load(files[WEIGHTS_FILE])
    return {key.removeprefix("base_model.model."): value for key, value in tensors.items()}


@pytest.mark.parametrize("strategy", ["dare_linear", "dare_ties", "ties"])
def test_pruning_strategies_equal_peft_merge_utils(adapters, strategy):
    base, dirs = adapters
    names = ["all-r8", "all-r8b", "qv-r8"]
    components = _parsed(base, dirs, names)
    spec = MergeSpec((0.9, -0.7, 1.4), strategy, 0.4, "frequency")
    merged = _factors(merge_adapters(components, spec, names, 64))
    identity = merge_identity([component.ref.identity for component in components], spec)
    peft_merge = getattr(merge_utils, strategy)
    extra = {} if strategy == "dare_linear" else {"majority_sign_method": "frequency"}
    for module in components[0].weights:
        present = [(c, w) for c, w in zip(components, spec.weights) if module in c.weights]
        scaled = [w * c.scaling(module) for c, w in present]
        for index, factor in enumerate(("lora_A", "lora_B")):
            roots = [math.copysign(math.sqrt(abs(s)), s) if index == 0 else math.sqrt(abs(s)) for s in scaled]
            torch.manual_seed(dare_seed(identity, module, factor))  # PEFT draws from torch's global generator
            expected = peft_merge([c.weights[module][index] for c, _ in present], torch.tensor(roots), 0.4, **extra)
            assert torch.equal(merged[f"{module}.{factor}.weight"], expected), (module, factor)
    # Seeded by content: the same request merges to the same adapter; other weights draw anew.
    assert merge_adapters(components, spec, names, 64) == merge_adapters(components, spec, names, 64)


def test_merged_config_gives_every_module_scaling_one(adapters):
    base, dirs = adapters
    names = ["attn-r4", "all-r8"]
    files = merge_adapters(_parsed(base, dirs, names), MergeSpec((1.0, 2.0)), names, 64)
    config = json.loads(files[CONFIG_FILE])
    merged = parse_adapter("m", config, files[WEIGHTS_FILE], _model_config(base), 64, torch.float32)
    assert merged.ref.rank == 12 and merged.scaling("model.layers.0.self_attn.q_proj") == 1.0
    assert merged.weights["model.layers.1.mlp.down_proj"][0].shape[0] == 8  # rank_pattern: no padding
    assert merged.scaling("model.layers.1.mlp.down_proj") == 1.0 and config["lora_alpha"] == 12


def test_one_adapter_is_linear_whatever_the_strategy(adapters):
    base, dirs = adapters
    [component] = _parsed(base, dirs, ["all-r8"])
    ties = merge_adapters([component], MergeSpec((0.5,), "dare_ties", 0.1), ["all-r8"], 64)
    linear = merge_adapters([component], MergeSpec((0.5,)), ["all-r8"], 64)
    assert ties == linear


@pytest.mark.parametrize(
    ("names", "spec", "field", "words"),
    [
        (["all-r8", "attn-r4"], MergeSpec((1.0, 1.0), "ties", 0.5), "ids", "same rank"),
        (["all-r8", "all-r8b", "mlp-r16-rs"], MergeSpec((1.0, 1.0, 1.0)), "ids", "max_lora_rank 16"),
        (["all-r8", "all-r8b"], MergeSpec((1.0,)), "weights", "2 ids"),
        (["all-r8", "all-r8b"], MergeSpec((1.0, float("nan"))), "weights", "finite"),
        (["all-r8", "all-r8b"], MergeSpec((1.0, 1.0), "dare_ties", 0.0), "density", "density 0"),
        (["all-r8", "all-r8b"], MergeSpec((1.0, 1.0), "ties", float("nan")), "density", "[0, 1]"),
        (["all-r8", "all-r8b"], MergeSpec((1.0, 1.0), "slerp"), "merge_strategy", "linear, ties"),
        (["all-r8", "all-r8b"], MergeSpec((1.0, 1.0), "ties", 0.5, "mean"), "majority_sign_method", "total"),
    ],
)
def test_what_cannot_be_merged_is_refused_by_name(adapters, names, spec, field, words):
    base, dirs = adapters
    with pytest.raises(MergeError) as raised:
        merge_adapters(_parsed(base, dirs, names), spec, names, 16)
    assert raised.value.field == field and words in str(raised.value)


def test_llm_merge_of_an_unknown_adapter_names_it(adapters):
    base, dirs = adapters
    llm = LLM(str(base), max_lora_rank=16, max_loras=2, num_blocks=16, block_size=4)
    llm.load_adapter("all-r8", dirs["all-r8"])
    with pytest.raises(LookupError, match="nope"):
        llm.merge_adapters("mix", ["all-r8", "nope"])


def test_dora_lora_bias_and_activated_lora_components_are_refused_by_name(adapters):
    base, dirs = adapters
    [plain, other] = _parsed(base, dirs, ["all-r8", "all-r8b"])
    module = next(iter(plain.weights))
    vector = torch.ones(plain.weights[module][1].shape[0])
    for changed, words in ((replace(plain, magnitudes={module: vector}), "use_dora"),
                           (replace(plain, biases={module: vector}), "lora_bias"),
                           (replace(plain, ref=replace(plain.ref, invocation_tokens=(5, 6))), "alora")):  # fmt: skip
        with pytest.raises(MergeError, match=words):
            merge_adapters([changed, other], MergeSpec((1.0, 1.0)), ["x", "y"], 64)
