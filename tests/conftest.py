from __future__ import annotations

import logging

import pytest

from tests.factories import MIXED_ADAPTERS, make_adapter, tiny_llama

logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session", params=["gqa-untied", "mha-tied"])
def tiny_model(request, tmp_path_factory):
    """(base_dir, {adapter name: dir}) for a tiny random Llama and four mixed-rank PEFT adapters."""
    heads, kv_heads, tie = (4, 2, False) if request.param == "gqa-untied" else (4, 4, True)
    root = tmp_path_factory.mktemp(request.param)
    base = tiny_llama(root / "base", num_heads=heads, num_kv_heads=kv_heads, tie=tie)
    adapters = {
        spec.name: make_adapter(base, spec, root / spec.name, seed=index + 1) for index, spec in enumerate(MIXED_ADAPTERS)
    }
    return base, adapters


@pytest.fixture(scope="session")
def tiny_gqa(tmp_path_factory):
    """One tiny GQA model with the four mixed adapters, for engine behaviour tests."""
    root = tmp_path_factory.mktemp("gqa")
    base = tiny_llama(root / "base", num_heads=4, num_kv_heads=2, tie=False, seed=5)
    adapters = {
        spec.name: make_adapter(base, spec, root / spec.name, seed=index + 11) for index, spec in enumerate(MIXED_ADAPTERS)
    }
    return base, adapters


@pytest.fixture(scope="session")
def bundled_llm():
    """The real bundled SmolLM2 (no LoRA slots), shared by tests that need a tokenizer."""
    from kvrun import LLM

    return LLM(max_loras=1, num_blocks=256)
