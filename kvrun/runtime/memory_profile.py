"""Start-up sizing: resolve the settings left to the engine, measure the device, and apply memory_plan's arithmetic.

Order (the engine's start-up): note the device's free memory, load the model (ModelRunner, no KV cache yet), then
`size_engine` profiles one max-size step and one max-batch decode step on a temporary KV cache, plans, and returns
the EngineConfig with every automatic value filled in (max_num_seqs, max_num_batched_tokens, max_loras, num_blocks).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, replace

import torch

from kvrun.config import EngineConfig
from kvrun.runtime import memory_plan
from kvrun.runtime.cuda_graph import BUCKETS
from kvrun.runtime.forward_batch import BASE_SLOT, ScheduledBatch, ScheduledRequest
from kvrun.runtime.kv_cache import bytes_per_block
from kvrun.runtime.layers.linear import Projection
from kvrun.runtime.layers.vocab import EMBEDDING, HEAD, VocabParallelEmbedding
from kvrun.runtime.memory_plan import MemoryPlan
from kvrun.runtime.step_graphs import token_buckets

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceStart:
    """The device before the engine allocates anything (bytes)."""

    free: int  # free on the device (memory this process's allocator had cached but not used counts as free)
    allocated: int  # held by tensors of this process already (another engine, say)
    reserved: int  # held by this process's caching allocator


def device_start(device: torch.device) -> DeviceStart | None:
    """None off CUDA: nothing is measured or planned there."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return DeviceStart(free, torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device))


def resolve_scheduler_defaults(config: EngineConfig, on_gpu: bool) -> EngineConfig:
    """The device's defaults where unset; each unset one adapts to the other, since a step holds a token per row."""
    scheduler = config.scheduler
    default_seqs = memory_plan.GPU_MAX_NUM_SEQS if on_gpu else memory_plan.CPU_MAX_NUM_SEQS
    if not on_gpu:
        default_tokens = memory_plan.CPU_MAX_NUM_BATCHED_TOKENS
    elif scheduler.online:
        default_tokens = memory_plan.GPU_ONLINE_MAX_NUM_BATCHED_TOKENS
    else:
        default_tokens = memory_plan.GPU_MAX_NUM_BATCHED_TOKENS
    max_num_seqs = scheduler.max_num_seqs or min(default_seqs, scheduler.max_num_batched_tokens or default_seqs)
    max_num_batched_tokens = scheduler.max_num_batched_tokens or max(default_tokens, max_num_seqs)
    return replace(
        config, scheduler=replace(scheduler, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
    )


def size_engine(runner, config: EngineConfig, start: DeviceStart | None) -> tuple[EngineConfig, MemoryPlan | None]:
    """The config with every automatic value chosen, and the GPU memory plan behind it (None: nothing planned)."""
    config = resolve_scheduler_defaults(config, start is not None)
    cache, lora = config.cache, config.lora
    block_bytes = bytes_per_block(runner.model_config, cache.block_size, runner.dtype, runner.num_kv_heads)
    plan = None
    if cache.num_blocks is not None:
        num_blocks, max_loras = cache.num_blocks, lora.max_loras
    elif start is None or cache.kv_cache_memory_bytes is not None:
        kv_bytes = cache.kv_cache_memory_bytes or memory_plan.CPU_KV_CACHE_BYTES
        num_blocks, max_loras = max(1, kv_bytes // block_bytes), lora.max_loras
    else:
        plan = _plan(runner, config, start, block_bytes)
        logger.info(plan.describe())
        num_blocks, max_loras = plan.num_blocks, plan.max_loras
    max_loras = memory_plan.UNPLANNED_MAX_LORAS if max_loras is None else max_loras
    if plan is None and num_blocks * cache.block_size < runner.max_model_len:
        logger.warning(
            "the KV cache holds %d tokens (%d blocks of %d), less than max_model_len %d: a request's prompt and "
            "output together may not exceed %d tokens", num_blocks * cache.block_size, num_blocks, cache.block_size,
            runner.max_model_len, num_blocks * cache.block_size,
        )  # fmt: skip
    return replace(
        config,
        cache=replace(cache, num_blocks=num_blocks),
        lora=replace(lora, max_loras=max_loras, max_cpu_loras=max(lora.max_cpu_loras, max_loras)),
    ), plan


def _plan(runner, config: EngineConfig, start: DeviceStart, block_bytes: int) -> MemoryPlan:
    device, scheduler, lora = runner.device, config.scheduler, config.lora
    total = torch.cuda.mem_get_info(device)[1]
    weights = torch.cuda.memory_allocated(device) - start.allocated
    step_tokens = scheduler.max_num_batched_tokens
    if not scheduler.enable_chunked_prefill:
        step_tokens = max(step_tokens, runner.max_model_len)  # a whole prompt may run over the budget
    activations = profile_step_bytes(runner, step_tokens, min(scheduler.max_num_seqs, step_tokens))
    decode_activations = profile_step_bytes(runner, scheduler.max_num_seqs, scheduler.max_num_seqs)
    graph_tokens = token_buckets(config.graph_step_tokens())
    step_graph_activations = 0
    if graph_tokens and graph_tokens[-1] == step_tokens:
        step_graph_activations = activations
    elif graph_tokens:
        largest = graph_tokens[-1]
        step_graph_activations = profile_step_bytes(runner, largest, min(scheduler.max_num_seqs, largest))
    runner.release_kv_cache()
    torch.cuda.empty_cache()
    free_now = torch.cuda.mem_get_info(device)[0]
    # What the device lost since start-up beyond what torch's allocator holds: CUDA context, library workspaces.
    non_torch = max(0, (start.free - free_now) - (torch.cuda.memory_reserved(device) - start.reserved))
    element = torch.empty((), dtype=runner.dtype).element_size()
    graph_sizes = ()
    if config.cuda_graphs:
        graph_sizes = tuple(size for size in BUCKETS if size < scheduler.max_num_seqs) + (scheduler.max_num_seqs,)
    measured = memory_plan.Measurements(total, start.free, weights, activations, decode_activations, non_torch,
                                        step_graph_activations)  # fmt: skip
    attention = runner.attention
    inputs = memory_plan.PlanInputs(
        utilization=config.cache.gpu_memory_utilization,
        max_num_seqs=scheduler.max_num_seqs,
        max_num_batched_tokens=step_tokens,
        max_model_len=runner.max_model_len,
        block_size=config.cache.block_size,
        kv_bytes_per_block=block_bytes,
        max_loras=lora.max_loras,
        lora_slot_bytes=lora_slot_bytes(runner.model, lora.max_lora_rank, element, lora.max_trainable_tokens),
        full_module_bytes=full_module_slot_bytes(runner.model, element) * lora.max_full_module_slots,
        lora_workspace_bytes=lora_workspace_bytes(runner.model, step_tokens, lora.max_lora_rank),
        vocab_size=runner.model_config.vocab_size,
        logits_element_bytes=element,
        graph_batch_sizes=graph_sizes,
        graphs_with_lora=lora.max_loras != 0,
        graph_buffer_bytes=attention.graph_buffer_bytes,
        graph_page_index_bytes=attention.graph_page_index_bytes,
        graph_step_tokens=graph_tokens,
        stream_bytes_per_token=2 * runner.model_config.hidden_size * element,
        attention_buffer_bytes_per_token=2 * attention.num_heads * attention.head_dim * element,
    )
    return memory_plan.plan_gpu_memory(measured, inputs)


def lora_slot_bytes(model: torch.nn.Module, max_rank: int, element_bytes: int, max_tokens: int = 0) -> int:
    """One adapter slot: an A [max_rank, in] per output slice and a B [width, max_rank] per slice, every projection,
    and per output feature the expand epilogue's fp32 scale and model-dtype shift (lora_bias, DoRA); per role of
    each vocabulary matrix, max_tokens trainable-token rows and their int64 ids."""
    projections = [module for module in model.modules() if isinstance(module, Projection)]
    total = sum(
        max_rank * (len(module.output_slices) * module.in_features + module.out_features) * element_bytes
        + module.out_features * (4 + element_bytes)
        for module in projections
    )
    # The vocabulary matrix's: an embedding's A^T [vocab, max_rank] and B [width, max_rank]; the output layer's as
    # a projection of one slice, this rank's vocabulary rows wide.
    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding):
            width = module.weight.shape[1]
            if EMBEDDING in module.roles:
                total += max_rank * (module.vocab_size + width) * element_bytes
            if HEAD in module.roles:
                total += max_rank * (width + module.num_local) * element_bytes + module.num_local * (4 + element_bytes)
            total += len(module.roles) * max_tokens * (width * element_bytes + 8)
    return total


def full_module_slot_bytes(model: torch.nn.Module, element_bytes: int) -> int:
    """One full-module slot (modules_to_save): a copy of this rank's rows of each vocabulary matrix (and its bias)
    per role it plays."""
    return sum(
        len(module.roles) * (module.weight.numel() + (module.bias.numel() if module.bias is not None else 0))
        * element_bytes
        for module in model.modules()
        if isinstance(module, VocabParallelEmbedding)
    )  # fmt: skip


def lora_workspace_bytes(model: torch.nn.Module, num_tokens: int, max_rank: int) -> int:
    """The largest per-projection shrink output a step allocates: [slices, tokens, max_rank] in fp32."""
    slices = max((len(m.output_slices) for m in model.modules() if isinstance(m, Projection)), default=0)
    return slices * num_tokens * max_rank * 4


def profile_step_bytes(runner, num_tokens: int, num_rows: int) -> int:
    """CUDA memory one step of num_tokens prompt tokens over num_rows rows adds at its peak (its KV cache aside)."""
    batch = profile_batch(runner, num_tokens, num_rows)
    torch.cuda.synchronize(runner.device)
    torch.cuda.reset_peak_memory_stats(runner.device)
    before = torch.cuda.memory_allocated(runner.device)
    runner.execute(batch)
    torch.cuda.synchronize(runner.device)
    return torch.cuda.max_memory_allocated(runner.device) - before


def profile_batch(runner, num_tokens: int, num_rows: int) -> ScheduledBatch:
    """A step of num_tokens prompt tokens over num_rows base-model rows that all sample (so the logits are at their
    largest too), on a KV cache allocated just large enough for it (the real one replaces it)."""
    lengths = [num_tokens // num_rows + (1 if row < num_tokens % num_rows else 0) for row in range(num_rows)]
    tables, next_block = [], 0
    for length in lengths:
        count = -(-length // runner.block_size)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    runner.init_kv_cache(next_block)
    requests = [
        ScheduledRequest(
            request_id=f"profile-{row}", token_ids=[0] * length, start_position=0, block_table=table,
            adapter_slot=BASE_SLOT, temperature=0.0, top_p=1.0, top_k=0, generator=None, num_logprobs=None,
        )  # fmt: skip
        for row, (length, table) in enumerate(zip(lengths, tables))
    ]
    return ScheduledBatch(is_prefill=any(length > 1 for length in lengths), requests=requests)
