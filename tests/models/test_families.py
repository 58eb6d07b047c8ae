"""Every family kvrun serves matches HF transformers (+ PEFT) row by row, in fp32: greedy tokens identical,
logprobs within 1e-4 relative, for base rows and a mixed batch of three PEFT adapters (all-linear, a target list with
exclude_modules, an MLP-only rsLoRA restricted by layers_to_transform)."""

from __future__ import annotations

import pytest
import torch

from kvrun import LLM, SamplingParams
from tests.models.families import FAMILIES, CachedReference, make_peft_adapter, standard_adapters, tiny_checkpoint

MAX_TOKENS = 6
RTOL = 1e-4


def rows_for(adapters: list[str | None], seed: int = 7) -> list[tuple[list[int], str | None]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index, adapter in enumerate([*adapters, *adapters, None, None]):
        length = 3 + (index * 7) % 19  # up to 21 tokens: past every sliding window and Phi-3's switch at 16
        rows.append((torch.randint(3, 250, (length,), generator=generator).tolist(), adapter))
    return rows


def assert_rows_match(outputs, rows, reference, max_tokens: int = MAX_TOKENS) -> None:
    for output, (prompt, adapter) in zip(outputs, rows):
        tokens, logprobs = reference.greedy(prompt, adapter, max_tokens)
        assert output.token_ids == tokens, f"adapter {adapter}, prompt length {len(prompt)}: greedy tokens differ"
        for step, expected in enumerate(logprobs):
            for token_id, value in output.logprobs[step].items():
                want = float(expected[token_id])
                assert abs(value - want) <= RTOL * max(1.0, abs(want)), (adapter, step, token_id, value, want)


def generate(llm: LLM, rows, max_tokens: int = MAX_TOKENS):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=5, ignore_eos=True)
    return llm.generate([prompt for prompt, _ in rows], params, adapters=[adapter for _, adapter in rows])


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request, tmp_path_factory):
    family = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(family.name)
    base = tiny_checkpoint(family, root / "base", seed=3)
    adapters = {
        spec.name: make_peft_adapter(base, spec, root / spec.name, seed=index + 1)
        for index, spec in enumerate(standard_adapters(family))
    }
    return family, base, adapters


def test_family_mixed_adapter_batch_matches_hf_peft(family_model):
    family, base, adapters = family_model
    llm = LLM(str(base), max_loras=3, max_lora_rank=16, num_blocks=96, block_size=4)
    for name, directory in adapters.items():
        llm.load_adapter(name, directory)
    rows = rows_for(list(adapters))
    assert_rows_match(generate(llm, rows), rows, CachedReference(base, adapters))


def test_family_base_model_without_lora_matches_hf(family_model):
    family, base, _ = family_model
    llm = LLM(str(base), max_loras=0, num_blocks=96, block_size=4)
    rows = rows_for([None], seed=11)
    assert_rows_match(generate(llm, rows), rows, CachedReference(base, {}))
