"""Tensor parallelism on CPU (gloo): two ranks give the greedy tokens one device gives, for a mixed batch of
adapters of different ranks and target subsets plus base rows; a worker that dies takes the engine down with an
error that names it, never a hang."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from kvrun import LLM, SamplingParams
from kvrun.runtime.distributed.executor import WorkerDiedError
from tests.models.families import FAMILIES, PeftSpec, make_peft_adapter, standard_adapters, tiny_checkpoint

MAX_TOKENS = 5
# Qwen2 with a single K/V head: both ranks hold a copy of it (replicated K/V heads); Phi-3 packs q/k/v and gate/up
# as single checkpoint modules, split per part. BLOOM and MPT: ALiBi, each rank with the slopes of its own heads
# (the whole model's, not those of a model of two heads). Falcon's new_decoder_architecture with one K/V head
# (grouped fused q/k/v: the ranks split that head's queries and copy its key and value); Falcon's multi-query
# layout (q | k | v, one K/V head).
CASES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {"num_key_value_heads": 1}),
    "phi3": ("phi3", {}),
    "bloom": ("bloom", {}),
    "mpt": ("mpt", {}),
    "falcon-grouped-1kv": ("falcon", {"num_kv_heads": 1}),
    "falcon-multi-query": ("falcon", {"new_decoder_architecture": False, "multi_query": True, "parallel_attn": True}),
}


def rows(adapters: list[str | None], seed: int) -> list[tuple[list[int], str | None]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(3, 250, (3 + (index * 5) % 17,), generator=generator).tolist(), adapter)
        for index, adapter in enumerate([*adapters, None, *adapters, None])
    ]


def generate(llm: LLM, batch) -> list[tuple[list[int], list[dict[int, float]]]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=5)
    outputs = llm.generate([prompt for prompt, _ in batch], params, adapters=[adapter for _, adapter in batch])
    return [(output.token_ids, output.logprobs) for output in outputs]


def assert_same_rows(got, expected) -> None:
    """Greedy tokens identical, top logprobs within fp32 summation-order noise (a wrong bias or scale on one rank
    shows there before it flips a token)."""
    for row, ((tokens, logprobs), (want_tokens, want_logprobs)) in enumerate(zip(got, expected)):
        assert tokens == want_tokens, f"row {row}: greedy tokens differ"
        for step, (top, want_top) in enumerate(zip(logprobs, want_logprobs)):
            assert top.keys() == want_top.keys(), (row, step)
            for token, value in top.items():
                assert abs(value - want_top[token]) <= 1e-4 * max(1.0, abs(want_top[token])), (row, step, token)


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    family_name, overrides = CASES[request.param]
    family = FAMILIES[family_name]
    root = tmp_path_factory.mktemp(f"tp-{request.param}")
    base = tiny_checkpoint(family, root / "base", seed=5, **overrides)
    adapters = {
        spec.name: make_peft_adapter(base, spec, root / spec.name, seed=index + 1)
        for index, spec in enumerate(standard_adapters(family))
    }
    return base, adapters


def start(base, adapters, tensor_parallel_size: int) -> LLM:
    llm = LLM(str(base), tensor_parallel_size=tensor_parallel_size, max_loras=2, max_lora_rank=16, num_blocks=64,
              block_size=4, max_num_seqs=6)  # fmt: skip
    for name, directory in adapters.items():
        llm.load_adapter(name, directory)
    return llm


def test_two_ranks_match_one_device_on_mixed_adapter_batch(checkpoint):
    base, adapters = checkpoint
    # Two slots for three adapters and six rows a step: adapters are evicted and reloaded into slots mid-run.
    batch = rows(list(adapters), seed=3)
    single = start(base, adapters, 1)
    expected = generate(single, batch)
    parallel = start(base, adapters, 2)
    try:
        assert parallel.engine.runner.tp.size == 2
        assert_same_rows(generate(parallel, batch), expected)
    finally:
        parallel.shutdown()


def test_two_ranks_serve_embedding_and_output_layer_lora(tmp_path):
    """Each rank holds its vocabulary rows of the output layer's LoRA B (an odd vocabulary: rank 1's last row is
    padding) and the whole embedding LoRA, added after the embedding's all-reduce."""
    base = tiny_checkpoint(FAMILIES["llama"], tmp_path / "base", seed=5, vocab_size=257)
    spec = PeftSpec("vocab", 4, ["q_proj", "embed_tokens", "lm_head"], alpha=8.0)
    adapters = {"vocab": make_peft_adapter(base, spec, tmp_path / "vocab", seed=1)}
    batch = rows(list(adapters), seed=4)
    expected = generate(start(base, adapters, 1), batch)
    parallel = start(base, adapters, 2)
    try:
        assert_same_rows(generate(parallel, batch), expected)
    finally:
        parallel.shutdown()


def test_two_ranks_with_async_scheduling_match_steps_in_order(tmp_path):
    """Async scheduling on two ranks: rank 0 broadcasts each step's sampled tokens to the worker before the next
    step, so both ranks read the same pending tokens. Rows of mixed adapters and lengths that end at different
    steps, greedy and seeded draws, give what steps in order give."""
    family = FAMILIES["llama"]
    base = tiny_checkpoint(family, tmp_path / "base", seed=5)
    adapters = {
        spec.name: make_peft_adapter(base, spec, tmp_path / spec.name, seed=index + 1)
        for index, spec in enumerate(standard_adapters(family))
    }
    batch = rows(list(adapters), seed=6)
    params = [
        SamplingParams(max_tokens=3 + index % 5, temperature=0.0 if index % 2 else 0.9, seed=index, ignore_eos=True,
                       logprobs=2)
        for index in range(len(batch))
    ]  # fmt: skip
    results = {}
    for async_scheduling in (False, True):
        llm = LLM(str(base), tensor_parallel_size=2, max_loras=2, max_lora_rank=16, num_blocks=64, block_size=4,
                  max_num_seqs=6, async_scheduling=async_scheduling)  # fmt: skip
        try:
            assert llm.engine.async_scheduling is async_scheduling
            for name, directory in adapters.items():
                llm.load_adapter(name, directory)
            outputs = llm.generate([prompt for prompt, _ in batch], params, adapters=[a for _, a in batch])
            results[async_scheduling] = [(output.token_ids, output.logprobs) for output in outputs]
        finally:
            llm.shutdown()
    assert [len(tokens) for tokens, _ in results[True]] == [p.max_tokens for p in params]
    assert_same_rows(results[True], results[False])


def test_dead_worker_stops_the_engine_with_a_clear_error(tmp_path):
    llm = start(tiny_checkpoint(FAMILIES["llama"], tmp_path / "base"), {}, 2)
    try:
        worker = llm.engine.runner.workers.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        with pytest.raises(WorkerDiedError, match=r"rank 1 \(pid \d+\) exited with code -9"):
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
        with pytest.raises(WorkerDiedError):  # and stays down
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
    finally:
        llm.shutdown()


def _fail_on_worker(runner) -> None:
    raise RuntimeError("a worker-side failure")


def test_a_worker_that_fails_sends_its_traceback_to_rank_0(tmp_path):
    llm = start(tiny_checkpoint(FAMILIES["llama"], tmp_path / "base"), {}, 2)
    try:
        with pytest.raises(WorkerDiedError, match=r"(?s)rank 1 failed:.*RuntimeError: a worker-side failure"):
            llm.engine.runner.workers.call(_fail_on_worker)
    finally:
        llm.shutdown()


def test_dora_and_lora_bias_adapters_split_over_two_ranks_match_peft(tmp_path):
    """DoRA and lora_bias on every attention and MLP module of a Llama whose projections all carry a base bias,
    beside a plain adapter and base rows: two ranks give HF + PEFT's tokens and logprobs, as one device does
    (tests/adapters/test_peft_features.py).
    Under two ranks o_proj and down_proj are row-parallel: their DoRA norms are summed over the ranks, the rescaling
    applies to each rank's partial output, and the base bias and lora_bias are added once."""
    from tests.adapters.peft_extras import with_trained_magnitudes
    from tests.adapters.test_peft_features import FeatureModel
    from tests.models.families import PeftSpec

    model = FeatureModel("llama", tmp_path)
    targets = [*model.family.attention, *model.family.mlp]
    dora = model.add(PeftSpec("dora", 4, targets, alpha=8.0, extra={"use_dora": True, "rank_pattern": {"o_proj": 6}}))
    with_trained_magnitudes(model.base, model.adapters[dora], seed=5)
    bias = model.add(PeftSpec("lora-bias", 4, targets, alpha=8.0, extra={"lora_bias": True}))
    model.check_mixed_batch(dora, bias, tensor_parallel_size=2)


def test_trainable_tokens_and_layer_copies_split_over_two_ranks_match_peft(tmp_path):
    """Trainable tokens (tied embeddings: the output layer's rows too) and whole copies of the embedding and output
    layer (each rank holds its vocabulary rows of a copy; an odd vocabulary pads rank 1) over two ranks give HF +
    PEFT's tokens and logprobs."""
    from tests.adapters.test_peft_features import FeatureModel
    from tests.adapters.test_vocab_features import TOKENS

    model = FeatureModel("llama", tmp_path, tie_word_embeddings=True, vocab_size=257)
    tokens = model.add(PeftSpec("tokens", 4, ["q_proj"], extra={"trainable_token_indices": TOKENS}))
    copies = model.add(PeftSpec("copies", 4, ["v_proj"], extra={"modules_to_save": ["embed_tokens", "lm_head"]}))
    model.check_mixed_batch(tokens, copies, tensor_parallel_size=2, max_full_module_slots=1)
