"""The memory plan's arithmetic on made-up device sizes, and start-up sizing on CPU."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvrun.runtime import memory_plan
from kvrun.runtime.memory_plan import GIB, MIB, Measurements, MemoryPlanError, PlanInputs, plan_gpu_memory

# Llama-3-8B-like shapes in bf16: 32 layers × 8 KV heads × 128 dims × K and V × 2 bytes = 128 KiB per token.
BLOCK_BYTES = 16 * 128 * 1024
VOCAB = 128256
SLOT_BYTES = 320 * MIB  # one rank-64 adapter slot over every projection


def h100(**changes) -> Measurements:
    values = dict(total=80 * GIB, free_at_start=79 * GIB, weights=15 * GIB, activations=2 * GIB,
                  decode_activations=256 * MIB, non_torch=GIB // 2)  # fmt: skip
    return Measurements(**{**values, **changes})


def inputs(**changes) -> PlanInputs:
    values = dict(utilization=0.9, max_num_seqs=256, max_num_batched_tokens=512, max_model_len=8192, block_size=16,
                  kv_bytes_per_block=BLOCK_BYTES, max_loras=None, lora_slot_bytes=SLOT_BYTES,
                  lora_workspace_bytes=24 * MIB, vocab_size=VOCAB, logits_element_bytes=2,
                  graph_batch_sizes=(1, 2, 4, 8), graphs_with_lora=True)  # fmt: skip
    return PlanInputs(**{**values, **changes})


def test_kv_cache_gets_what_the_budget_leaves():
    plan = plan_gpu_memory(h100(), inputs())
    budget = int(0.9 * 80 * GIB)
    sampler = 256 * VOCAB * memory_plan.SAMPLER_BYTES_PER_LOGIT  # working copies of every row's logits
    # largest decode step + logits kept by 2 graphs per size + the capture stream's cuBLAS workspace + the pool's
    # first segment
    graphs = 256 * MIB + (1 + 2 + 4 + 8) * VOCAB * 2 * 2 + 32 * MIB + 20 * MIB
    left = budget - 15 * GIB - 2 * GIB - sampler - graphs - GIB // 2 - memory_plan.ALLOCATOR_SLACK
    assert (plan.budget, plan.sampler, plan.graphs) == (budget, sampler, graphs)
    # A quarter of what is left buys slots (~13.4 GiB / 320 MiB = 42), within max_num_seqs and the cap of 64.
    assert plan.max_loras == int(0.25 * left // SLOT_BYTES) == 42
    assert plan.lora == 42 * SLOT_BYTES + 24 * MIB
    assert plan.num_blocks == (left - plan.lora) // BLOCK_BYTES
    assert plan.kv_cache == plan.num_blocks * BLOCK_BYTES and plan.kv_tokens == plan.num_blocks * 16
    total = plan.weights + plan.activations + plan.sampler + plan.graphs + plan.non_torch + plan.lora + plan.kv_cache
    assert budget - BLOCK_BYTES < total + memory_plan.ALLOCATOR_SLACK <= budget
    line = plan.describe()
    for figure in ("budget 72.00 GiB", "weights 15.00 GiB", "42 slots", f"{plan.num_blocks} blocks", "max_num_seqs 256"):
        assert figure in line


def test_full_module_slots_are_lora_memory_taken_from_the_kv_cache():
    """Two full-module slots of an 8B model's embedding and output layer (2 x 2 x 1 GiB in bf16) are counted with the
    LoRA slots, before the KV cache takes the rest."""
    without = plan_gpu_memory(h100(), inputs(max_loras=8))
    copies = 2 * 2 * VOCAB * 4096 * 2
    plan = plan_gpu_memory(h100(), inputs(max_loras=8, full_module_bytes=copies))
    assert plan.lora == without.lora + copies
    left = plan.budget - plan.weights - plan.activations - plan.sampler - plan.graphs - plan.non_torch
    left -= memory_plan.ALLOCATOR_SLACK
    assert without.num_blocks == (left - without.lora) // BLOCK_BYTES
    assert plan.num_blocks == (left - plan.lora) // BLOCK_BYTES


def test_auto_max_loras_stays_within_rows_and_the_cap():
    assert plan_gpu_memory(h100(), inputs(max_num_seqs=16, graph_batch_sizes=())).max_loras == 16
    assert plan_gpu_memory(h100(), inputs(lora_slot_bytes=20 * MIB)).max_loras == memory_plan.MAX_AUTO_LORAS


def test_auto_max_loras_shrinks_so_one_sequence_still_fits():
    # 24 GiB card: 2.6 GiB left. A quarter buys 2 slots of 320 MiB; a 16k context needs 2 GiB of KV, leaving 1.
    card = h100(total=24 * GIB, free_at_start=23 * GIB)
    assert plan_gpu_memory(card, inputs(max_model_len=8192)).max_loras == 2
    plan = plan_gpu_memory(card, inputs(max_model_len=16384))
    assert plan.max_loras == 1
    assert plan.kv_tokens >= 16384


def test_explicit_max_loras_is_kept_and_lora_off_costs_nothing():
    assert plan_gpu_memory(h100(), inputs(max_loras=4)).lora == 4 * SLOT_BYTES + 24 * MIB
    off = plan_gpu_memory(h100(), inputs(max_loras=0, graphs_with_lora=False))
    assert off.max_loras == 0 and off.lora == 0
    assert off.num_blocks > plan_gpu_memory(h100(), inputs(max_loras=4)).num_blocks


def test_refuses_when_one_sequence_cannot_fit_and_says_how_much_would():
    with pytest.raises(MemoryPlanError) as error:
        plan_gpu_memory(h100(total=24 * GIB, free_at_start=23 * GIB), inputs(max_model_len=131072))
    message = str(error.value)
    assert "max_model_len 131072 needs 16.00 GiB of KV cache for one sequence" in message
    assert "weights 15.00 GiB" in message and "budget 21.60 GiB" in message
    fitting = int(message.split("at most ")[1].split(" tokens")[0])
    assert 0 < fitting < 131072
    plan = plan_gpu_memory(h100(total=24 * GIB, free_at_start=23 * GIB), inputs(max_model_len=fitting))
    assert plan.kv_tokens >= fitting


def test_refuses_explicit_slots_that_leave_no_room():
    with pytest.raises(MemoryPlanError, match=r"LoRA 200 slots"):
        plan_gpu_memory(h100(), inputs(max_loras=200))


def test_refuses_a_budget_larger_than_the_free_memory():
    with pytest.raises(MemoryPlanError, match=r"only 40.00 GiB was free .* at most 0.50"):
        plan_gpu_memory(h100(free_at_start=40 * GIB), inputs())


def test_the_suggested_utilization_is_one_that_then_fits():
    """71.8 GiB free of 80: 0.8975 of the card. The hint rounds down (0.89), so following it passes this check."""
    with pytest.raises(MemoryPlanError, match=r"utilization 0.905 asks .* at most 0.89$"):
        plan_gpu_memory(h100(free_at_start=int(71.8 * GIB)), inputs(utilization=0.905))
    plan_gpu_memory(h100(free_at_start=int(71.8 * GIB)), inputs(utilization=0.89))


def test_graphs_off_and_on():
    assert memory_plan.graph_pool_bytes(inputs(graph_batch_sizes=()), 256 * MIB) == 0
    base_only = memory_plan.graph_pool_bytes(inputs(graphs_with_lora=False), 0)
    workspace = memory_plan.CAPTURE_STREAM_WORKSPACE + memory_plan.GRAPH_POOL_SEGMENT
    assert memory_plan.graph_pool_bytes(inputs(), 0) - workspace == 2 * (base_only - workspace) == 2 * 15 * VOCAB * 2
    # The attention backend's buffers for each captured size (FlashInfer: a plan workspace per decode wrapper).
    with_buffers = memory_plan.graph_pool_bytes(inputs(graph_buffer_bytes=8 * MIB), 0)
    assert with_buffers - memory_plan.graph_pool_bytes(inputs(), 0) == 4 * 8 * MIB  # 4 captured sizes: 1, 2, 4, 8
    # ... and each captured row's page indices for a whole max_model_len sequence: 128k tokens in 16-token pages
    # over rows 1 + 2 + 4 + 8, 4 bytes each for two attention variants.
    long = inputs(max_model_len=131072)
    with_pages = memory_plan.graph_pool_bytes(replace(long, graph_page_index_bytes=8), 0)
    assert with_pages - memory_plan.graph_pool_bytes(long, 0) == 15 * 8192 * 8


def test_steps_captured_in_pieces_share_the_pool_and_keep_their_streams():
    decode_only = memory_plan.graph_pool_bytes(inputs(), 256 * MIB)
    pieces = inputs(graph_step_tokens=(16, 32, 512), stream_bytes_per_token=8 * 1024,
                    attention_buffer_bytes_per_token=16 * 1024)  # fmt: skip
    # A smaller step peak hides under the decode peak (one pool); what each bucket keeps, LoRA and LoRA-free, and
    # the shared buffers at the largest token count are added.
    kept = 2 * (16 + 32 + 512) * 8 * 1024 + 512 * 16 * 1024
    assert memory_plan.graph_pool_bytes(pieces, 256 * MIB, 100 * MIB) == decode_only + kept
    assert memory_plan.graph_pool_bytes(pieces, 256 * MIB, 300 * MIB) == decode_only + kept + 44 * MIB
    # The plan takes the step peak from the measurements.
    with_pieces = plan_gpu_memory(h100(step_graph_activations=300 * MIB), pieces)
    assert with_pieces.graphs == decode_only + kept + 44 * MIB


def test_cpu_start_up_uses_the_fixed_defaults(tiny_gqa):
    from kvrun import LLM
    from kvrun.runtime.kv_cache import bytes_per_block

    llm = LLM(str(tiny_gqa[0]))
    config, engine = llm.engine.config, llm.engine
    assert engine.memory_plan is None
    assert config.scheduler.max_num_seqs == memory_plan.CPU_MAX_NUM_SEQS
    assert config.scheduler.max_num_batched_tokens == memory_plan.CPU_MAX_NUM_BATCHED_TOKENS
    assert config.lora.max_loras == memory_plan.UNPLANNED_MAX_LORAS
    block_bytes = bytes_per_block(engine.model_config, config.cache.block_size, engine.runner.dtype)
    assert config.cache.num_blocks == engine.blocks.num_blocks == memory_plan.CPU_KV_CACHE_BYTES // block_bytes
    explicit = LLM(str(tiny_gqa[0]), max_loras=3, max_num_seqs=4, max_num_batched_tokens=32, num_blocks=10)
    resolved = explicit.engine.config
    assert (resolved.lora.max_loras, resolved.scheduler.max_num_seqs) == (3, 4)
    assert (resolved.scheduler.max_num_batched_tokens, resolved.cache.num_blocks) == (32, 10)
    # Setting one of the two adapts the other: a step holds a token per running request.
    assert LLM(str(tiny_gqa[0]), max_num_seqs=300).engine.config.scheduler.max_num_batched_tokens == 300
    assert LLM(str(tiny_gqa[0]), max_num_batched_tokens=8).engine.config.scheduler.max_num_seqs == 8


def test_slot_arithmetic_matches_the_buffers_lora_allocates(tiny_gqa):
    from kvrun import LLM
    from kvrun.runtime.memory_profile import lora_slot_bytes

    from kvrun.adapters.vocab_layers import VocabWithLoRA
    from kvrun.runtime.memory_profile import full_module_slot_bytes

    def size(tensors) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

    llm = LLM(str(tiny_gqa[0]), max_loras=3, max_lora_rank=8, num_blocks=16, max_trainable_tokens=5,
              max_full_module_slots=2)  # fmt: skip
    allocated = 0
    for wrapper in llm.engine.adapters._wrappers:  # projections, and the embedding's and output layer's LoRA
        epilogue = getattr(wrapper, "epilogue", None)
        extras = (*epilogue.scale, *epilogue.shift) if epilogue is not None else ()
        allocated += size((*wrapper.lora_a, *wrapper.lora_b, *extras))
    vocab = [module for module in llm.engine.runner.model.modules() if isinstance(module, VocabWithLoRA)]
    allocated += sum(size((rows.ids, rows.rows)) for wrapper in vocab for rows in wrapper.tokens.values())
    assert allocated == 3 * lora_slot_bytes(llm.engine.runner.model, 8, 4, max_tokens=5)
    copies = sum(size((copy.weights,)) for wrapper in vocab for copy in wrapper.copies.values())
    assert copies > 0 and copies == 2 * full_module_slot_bytes(llm.engine.runner.model, 4)


def test_profile_batch_is_a_full_step_every_row_samples(tiny_gqa):
    from kvrun import LLM
    from kvrun.runtime.memory_profile import profile_batch

    runner = LLM(str(tiny_gqa[0]), max_loras=0, num_blocks=16).engine.runner
    batch = profile_batch(runner, num_tokens=45, num_rows=8)
    assert batch.num_tokens == 45 and len(batch.sampling_requests()) == 8 and batch.is_prefill
    assert runner.num_blocks == sum(len(row.block_table) for row in batch.requests)
    assert len(runner.execute(batch)) == 8


def test_gpu_step_budget_defaults_depend_on_offline_or_serving():
    from kvrun.config import EngineConfig, SchedulerConfig
    from kvrun.runtime.memory_profile import resolve_scheduler_defaults
    from kvrun.serving.config import ServerConfig

    def budget(scheduler: SchedulerConfig, on_gpu: bool = True) -> int:
        return resolve_scheduler_defaults(EngineConfig(scheduler=scheduler), on_gpu).scheduler.max_num_batched_tokens

    assert budget(SchedulerConfig()) == memory_plan.GPU_MAX_NUM_BATCHED_TOKENS == 8192
    served = ServerConfig().engine_config().scheduler
    assert served.online and budget(served) == memory_plan.GPU_ONLINE_MAX_NUM_BATCHED_TOKENS == 512
    assert budget(served, on_gpu=False) == budget(SchedulerConfig(), on_gpu=False) == memory_plan.CPU_MAX_NUM_BATCHED_TOKENS
    assert budget(SchedulerConfig(max_num_batched_tokens=640, online=True)) == 640  # an explicit value always wins


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(kv_cache_memory_bytes=12e9), "kv_cache_memory_bytes must be an integer"),
        (dict(gpu_memory_utilization="0.9"), "gpu_memory_utilization must be a number"),
        (dict(gpu_memory_utilization=float("nan")), "gpu_memory_utilization must be a number"),
        (dict(num_blocks=0), "num_blocks must be an integer >= 1"),
        (dict(max_model_len=0), "max_model_len must be an integer >= 1"),
        (dict(max_lora_rank=0), "max_lora_rank must be an integer >= 1"),
    ],
)
def test_settings_of_the_wrong_kind_are_refused_before_the_model_loads(tiny_gqa, settings, message):
    from kvrun import LLM

    with pytest.raises(ValueError, match=message):
        LLM(str(tiny_gqa[0]), **settings)


def test_a_context_longer_than_the_models_is_refused_with_both_lengths(tiny_gqa, caplog):
    from kvrun import LLM

    with pytest.raises(ValueError, match=r"max_model_len 100000 is longer than the model's context: 256 positions"):
        LLM(str(tiny_gqa[0]), max_model_len=100000)
    # A fixed KV cache smaller than one max_model_len sequence: the start says how long a request may be.
    with caplog.at_level("WARNING", logger="kvrun"):
        llm = LLM(str(tiny_gqa[0]), max_loras=0, num_blocks=4, block_size=16)
    assert llm.engine.max_model_len == 256 and "may not exceed 64 tokens" in caplog.text
