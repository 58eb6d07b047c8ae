"""Bad adapters are refused with a message naming the problem, and the engine keeps serving the good ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvrun import LLM, SamplingParams
from kvrun.adapters import AdapterError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def llm(tiny_gqa):
    base, adapters = tiny_gqa
    llm = LLM(str(base), max_loras=2, max_lora_rank=8, num_blocks=64, block_size=4)
    llm.load_adapter("good", adapters["attn-r4"])
    return llm


@pytest.fixture
def adapter_copy(tiny_gqa, tmp_path) -> Path:
    target = tmp_path / "adapter"
    shutil.copytree(tiny_gqa[1]["attn-r4"], target)
    return target


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / CONFIG).read_text())
    config.update(changes)
    (directory / CONFIG).write_text(json.dumps(config))


def edit_weights(directory: Path, change) -> None:
    tensors = load_file(directory / WEIGHTS)
    change(tensors)
    save_file(tensors, directory / WEIGHTS)


def first_key(tensors: dict, side: str) -> str:
    return sorted(key for key in tensors if f"lora_{side}" in key)[0]


def _nan(tensors):
    tensors[first_key(tensors, "A")][0, 0] = float("nan")


def _inf(tensors):
    tensors[first_key(tensors, "B")][1, 1] = float("inf")


def _drop_b(tensors):
    del tensors[first_key(tensors, "B")]


def _wrong_shape(tensors):
    key = first_key(tensors, "A")
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)


def _layer_out_of_range(tensors):
    key = first_key(tensors, "A")
    tensors[key.replace("layers.0.", "layers.7.")] = tensors.pop(key)


def _embedding(tensors):
    tensors["base_model.model.model.embed_tokens.lora_A.weight"] = torch.zeros(4, 64)


def _dora_vector(tensors):
    tensors[first_key(tensors, "A").replace("lora_A.weight", "lora_magnitude_vector")] = torch.ones(64)


def _lora_bias(tensors):
    key = first_key(tensors, "B")
    tensors[key.replace(".weight", ".bias")] = torch.zeros(tensors[key].shape[0])


def _int_weights(tensors):
    key = first_key(tensors, "A")
    tensors[key] = tensors[key].to(torch.int32)


def _huge_weights(tensors):
    key = first_key(tensors, "B")
    tensors[key] = tensors[key] * 1e30


def _pickle_only(directory):
    (directory / WEIGHTS).unlink()
    (directory / "adapter_model.bin").write_bytes(b"not loaded")


def _garbage(directory):
    (directory / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")


CASES = {
    "missing config": (lambda d: (d / CONFIG).unlink(), "adapter_config.json is missing"),
    "invalid json": (lambda d: (d / CONFIG).write_text("{"), "not valid JSON"),
    "missing weights": (lambda d: (d / WEIGHTS).unlink(), f"{WEIGHTS} is missing"),
    "pickle only": (_pickle_only, "pickle"),
    "corrupt safetensors": (_garbage, "not a valid safetensors"),
    "rank over max": (lambda d: edit_config(d, r=32), "exceeds this server's max_lora_rank 8"),
    "rank mismatch": (lambda d: edit_config(d, r=2), "expected"),
    "dora without magnitudes": (
        lambda d: edit_config(d, use_dora=True), r"has no lora_magnitude_vector \(adapter_config.json sets use_dora"
    ),
    "dora with lora_bias": (lambda d: edit_config(d, use_dora=True, lora_bias=True), "a combination PEFT refuses"),
    "modules_to_save": (lambda d: edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
    "bias": (lambda d: edit_config(d, bias="all"), "bias"),
    "unknown target": (lambda d: edit_config(d, target_modules=["q_proj", "embed_tokens"]), "embed_tokens"),
    "not lora": (lambda d: edit_config(d, peft_type="PREFIX_TUNING"), "PREFIX_TUNING"),
    "nan": (lambda d: edit_weights(d, _nan), "NaN or Inf"),
    "inf": (lambda d: edit_weights(d, _inf), "NaN or Inf"),
    "missing B": (lambda d: edit_weights(d, _drop_b), "no lora_B"),
    "shape": (lambda d: edit_weights(d, _wrong_shape), "has shape"),
    "layer out of range": (lambda d: edit_weights(d, _layer_out_of_range), "not a LoRA-targetable module .*2 layers"),
    "embedding key": (lambda d: edit_weights(d, _embedding), "embed_tokens"),
    "dora vector without use_dora": (lambda d: edit_weights(d, _dora_vector), "is a DoRA magnitude vector, but"),
    "bias without lora_bias": (lambda d: edit_weights(d, _lora_bias), "does not set lora_bias=true"),
    "lora_bias without biases": (lambda d: edit_config(d, lora_bias=True), r"has no lora_B.bias \(adapter_config"),
    "integer weights": (lambda d: edit_weights(d, _int_weights), "dtype"),
    "impossible magnitude": (lambda d: edit_weights(d, _huge_weights), "the bound for a trained LoRA weight"),
    "scaling past the dtype": (lambda d: edit_config(d, lora_alpha=1e308), r"scaling \(lora_alpha / r\) is .* cannot hold"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_adapter_is_refused_with_a_clear_message(llm, adapter_copy, case):
    break_it, message = CASES[case]
    break_it(adapter_copy)
    with pytest.raises(AdapterError, match=message):
        llm.load_adapter("bad", adapter_copy)
    assert "bad" not in llm.engine.adapters.names()
    output = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0), adapters=["good"])[0]
    assert len(output.token_ids) == 3


def test_missing_directory(llm, tmp_path):
    with pytest.raises(AdapterError, match="not a directory"):
        llm.load_adapter("bad", tmp_path / "absent")


def test_invalid_adapter_name(llm, adapter_copy):
    for name in ("", "../etc", "has space", "x" * 300):
        with pytest.raises(ValueError, match="invalid adapter name"):
            llm.load_adapter(name, adapter_copy)
