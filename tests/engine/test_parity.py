"""Every row of a mixed multi-adapter batch matches HF transformers + PEFT run on that row alone (fp32)."""

from __future__ import annotations

import pytest
import torch

from kvrun import LLM, SamplingParams
from tests.factories import HFReference

MAX_TOKENS = 8
TOP_LOGPROBS = 5
RTOL = 1e-4


def _rows(adapter_names: list[str]) -> list[tuple[list[int], str | None]]:
    generator = torch.Generator().manual_seed(7)
    rows = []
    # Two rows per adapter and three base rows, each with its own prompt length.
    for index, adapter in enumerate([*adapter_names, *adapter_names, None, None, None]):
        length = 3 + (index * 5) % 17
        rows.append((torch.randint(3, 250, (length,), generator=generator).tolist(), adapter))
    return rows


def assert_matches_reference(outputs, rows, reference: HFReference, max_tokens: int = MAX_TOKENS) -> None:
    for output, (prompt, adapter) in zip(outputs, rows):
        tokens, logprobs = reference.greedy(prompt, adapter, max_tokens)
        assert output.token_ids == tokens, f"adapter {adapter}: greedy tokens differ"
        for step, expected in enumerate(logprobs):
            for token_id, value in output.logprobs[step].items():
                want = float(expected[token_id])
                assert abs(value - want) <= RTOL * max(1.0, abs(want)), (adapter, step, token_id, value, want)


def generate_rows(llm: LLM, rows, max_tokens: int = MAX_TOKENS):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=TOP_LOGPROBS, ignore_eos=True)
    return llm.generate([prompt for prompt, _ in rows], params, adapters=[adapter for _, adapter in rows])


def check_mixed_batch(tiny_model, **llm_options) -> None:
    base_dir, adapter_dirs = tiny_model
    llm = LLM(str(base_dir), max_lora_rank=16, num_blocks=64, block_size=4, **llm_options)
    for name, directory in adapter_dirs.items():
        llm.load_adapter(name, directory)
    rows = _rows(list(adapter_dirs))
    assert_matches_reference(generate_rows(llm, rows), rows, HFReference(base_dir, adapter_dirs))


def test_mixed_batch_matches_hf_peft(tiny_model):
    check_mixed_batch(tiny_model, max_loras=4)


def test_more_adapters_than_slots_still_match(tiny_model):
    """Two slots for four adapters: requests wait for a slot, adapters are evicted and reloaded, results unchanged."""
    check_mixed_batch(tiny_model, max_loras=2, max_cpu_loras=2)


def test_logits_match_within_relative_tolerance(tiny_model):
    """The raw last-token logits of a mixed prefill batch, compared to HF + PEFT row by row."""
    from kvrun.runtime.forward_batch import ScheduledBatch, ScheduledRequest

    base_dir, adapter_dirs = tiny_model
    llm = LLM(str(base_dir), max_loras=4, max_lora_rank=16, num_blocks=64, block_size=4)
    for name, directory in adapter_dirs.items():
        llm.load_adapter(name, directory)
    engine = llm.engine
    rows = _rows(list(adapter_dirs))
    scheduled, next_block = [], 0
    for index, (prompt, adapter) in enumerate(rows):
        slot = -1 if adapter is None else engine.adapters.acquire(engine.adapters.resolve(adapter))
        blocks = list(range(next_block, next_block + (len(prompt) + 3) // 4))
        next_block += len(blocks)
        scheduled.append(ScheduledRequest(str(index), prompt, 0, blocks, slot, 0.0, 1.0, 0, None, None))
    scheduled.sort(key=lambda request: request.adapter_slot)
    batch = engine.runner.prepare(ScheduledBatch(True, scheduled))
    engine.runner.attention.plan(batch.attention)
    with torch.inference_mode():
        logits = engine.runner.model(batch, engine.runner.kv_cache)
    reference = HFReference(base_dir, adapter_dirs)
    for row, request in enumerate(scheduled):
        prompt, adapter = rows[int(request.request_id)]
        with torch.no_grad():
            expected = reference._logits(torch.tensor([prompt]), adapter)[0, -1]
        torch.testing.assert_close(logits[row], expected, rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("max_tokens", [6])
def test_bundled_smollm2_with_random_adapters(tmp_path, max_tokens):
    """The real bundled model, converted from its GGUF, with random adapters (init_lora_weights=False)."""
    from kvrun.runtime.loader import resolve_model
    from tests.factories import MIXED_ADAPTERS, make_adapter

    base_dir = resolve_model(None)
    specs = [MIXED_ADAPTERS[0], MIXED_ADAPTERS[2]]
    adapter_dirs = {spec.name: make_adapter(base_dir, spec, tmp_path / spec.name, seed=3) for spec in specs}
    llm = LLM(max_loras=2, max_lora_rank=16, num_blocks=64)
    for name, directory in adapter_dirs.items():
        llm.load_adapter(name, directory)
    prompts = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,"]
    rows = [(llm.tokenizer.encode(p), a) for p, a in zip(prompts * 2, [*adapter_dirs, None, None, *adapter_dirs])]
    outputs = generate_rows(llm, rows, max_tokens)
    assert_matches_reference(outputs, rows, HFReference(base_dir, adapter_dirs), max_tokens)
    assert len({tuple(o.token_ids) for o in outputs[:3]}) > 1  # adapters change what the model says
