"""On the card: the memory plan at start-up, and chunked prefill + prefix caching through FlashInfer's prefill path.

Mixed steps run FlashInfer's paged prefill with query rows shorter than their KV (chunks after earlier chunks, rows
after cached prefixes, one-token decode rows); the tolerances are test_engine_gpu's (bf16 against HF + PEFT,
teacher-forced).
"""

from __future__ import annotations

import gc

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from tests.gpu.test_engine_gpu import (  # noqa: E402
    EXACT_AGREEMENT,
    LOGPROB_ATOL,
    gpu_model,  # noqa: F401 - the fixture
    hf_peft,
    rows,
    teacher_forced,
)


def test_default_start_up_plans_the_card(gpu_model):  # noqa: F811
    from kvrun import LLM, SamplingParams
    from kvrun.runtime import memory_plan

    base, adapters = gpu_model
    gc.collect()
    torch.cuda.empty_cache()
    held_before = torch.cuda.memory_reserved()  # what earlier tests of this process still hold
    llm = LLM(str(base))
    engine = llm.engine
    plan = engine.memory_plan
    assert plan is not None
    assert engine.config.scheduler.max_num_seqs == memory_plan.GPU_MAX_NUM_SEQS
    assert engine.config.lora.max_loras == plan.max_loras >= 1
    assert engine.blocks.num_blocks == plan.num_blocks and plan.kv_tokens >= engine.max_model_len
    # What the process holds after start-up (weights, slots, KV cache, graphs) stays inside the planned budget.
    held = torch.cuda.memory_reserved() - held_before
    print(plan.describe(), f"| the engine holds {held / 2**30:.2f} GiB")
    assert held <= plan.budget
    name = next(iter(adapters))
    llm.load_adapter(name, adapters[name])
    outputs = llm.generate([[5, 6, 7]] * 4, SamplingParams(max_tokens=4, temperature=0.0), adapters=[name, None] * 2)
    assert all(len(output.token_ids) == 4 for output in outputs)


def test_refuses_a_context_that_cannot_fit(gpu_model):  # noqa: F811
    from kvrun import LLM
    from kvrun.runtime.memory_plan import MemoryPlanError

    base, _ = gpu_model
    weights_share = 0.001  # far less than the weights alone
    with pytest.raises(MemoryPlanError, match="max_model_len"):
        LLM(str(base), gpu_memory_utilization=weights_share)


@pytest.mark.parametrize("budget", [16, 64])
def test_chunked_prefill_and_prefix_cache_match_hf_peft(gpu_model, budget):  # noqa: F811
    from kvrun import LLM, SamplingParams

    base, adapters = gpu_model
    llm = LLM(str(base), dtype="bfloat16", max_loras=4, max_lora_rank=16, max_num_seqs=16,
              max_num_batched_tokens=budget)  # fmt: skip
    for name, directory in adapters.items():
        llm.load_adapter(name, directory)
    batch = rows(list(adapters), llm.engine.model_config.vocab_size)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
    prompts, names = [p for p, _ in batch], [a for _, a in batch]
    first = llm.generate(prompts, params, adapters=names)
    again = llm.generate(prompts, params, adapters=names)  # every full prompt block now comes from the cache
    assert llm.engine.scheduler.stats.prefix_cache_hits > 0
    del llm
    peft = hf_peft(base, adapters)
    for outputs in (first, again):
        exact = total = 0
        for output, (prompt, adapter) in zip(outputs, batch):
            reference = teacher_forced(peft, prompt, adapter, output.token_ids)
            for step, token in enumerate(output.token_ids):
                exact += int(reference[step].argmax()) == token
                total += 1
                assert abs(output.logprobs[step][token] - float(reference[step, token])) <= LOGPROB_ATOL, (adapter, step)
        assert exact / total >= EXACT_AGREEMENT, f"greedy agreement {exact}/{total}"
