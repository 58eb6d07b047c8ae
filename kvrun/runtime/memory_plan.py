"""How device memory is split at start-up: the arithmetic alone (measurements come from memory_profile).

On GPU the engine asks for `gpu_memory_utilization` (vLLM's name, default 0.9) of the card's memory and spends it:

    budget = utilization × total memory
    fixed  = weights (measured after loading) + activations (peak of one profiled max-size step)
             + sampler (max_num_seqs rows of fp32 working copies of the logits)
             + CUDA graphs (one pool: the profiled peak of the largest decode step or of the largest step captured
               in pieces, whichever is larger, + what each graph keeps: decode logits, the pieces' last hidden
               state and residual; + the pieces' shared query and attention-output buffers; + the attention
               backend's buffers of each captured batch size, its page indices for max_model_len included)
             + memory outside torch's allocator (CUDA context, cuBLAS workspaces)
    left   = budget − fixed, shared by the LoRA slots and the KV cache

The full-module slots (max_full_module_slots: whole per-adapter copies of the vocabulary layers) count as LoRA
memory. max_loras, when the user leaves it unset: as many slots as fit in LORA_SHARE (a quarter) of `left`, at least
1, at most max_num_seqs (more slots than rows can never be used in one step) and MAX_AUTO_LORAS; fewer if the KV cache
would otherwise not hold one max_model_len sequence. The KV cache takes everything else, in whole blocks. Start-up is
refused, with these numbers, when the KV cache cannot hold one sequence of max_model_len tokens.

On CPU nothing is measured: the KV cache is a fixed CPU_KV_CACHE_BYTES and the other defaults are fixed too. An
explicit `num_blocks` or `kv_cache_memory_bytes` replaces the plan (nothing is profiled; max_loras defaults to
UNPLANNED_MAX_LORAS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 1 << 30
MIB = 1 << 20

GPU_MAX_NUM_SEQS = 256
# Offline (LLM): a burst of prompts starts in one or two steps, so rows run (and finish) together; with 512 tokens a
# burst of 128 x 128-token prompts took 32 steps to start and decode ran 21% below an 8192-token budget (H200,
# Llama-3-8B shapes, docs/benchmarks.md). A server (SchedulerConfig.online) chunks prompts finer, for the running
# streams' inter-token latency: a 512-token mixed step costs about two decode steps on an 8B model, a 2048-token one
# several (ITL p99 with 4000-token prompts arriving: see docs/benchmarks.md).
GPU_MAX_NUM_BATCHED_TOKENS = 8192
GPU_ONLINE_MAX_NUM_BATCHED_TOKENS = 512
# cuBLAS's workspace for the one stream graphs are captured on (PyTorch's default on Hopper: 8 x 4 MiB), and the
# graph pool's first segment (PyTorch's allocator serves 1-10 MB blocks from 20 MiB segments).
CAPTURE_STREAM_WORKSPACE = 32 * MIB
GRAPH_POOL_SEGMENT = 20 * MIB
# What torch's caching allocator keeps reserved but unused inside its segments once start-up is done (36 MiB measured
# on an H200 with a small model's 15 captured sizes): reserved memory is what the budget bounds.
ALLOCATOR_SLACK = 64 * MIB
LORA_SHARE = 0.25
MAX_AUTO_LORAS = 64
# The sampler's working copies of a row's logits at their worst (top-k/top-p rows): fp32 logits, log-probabilities,
# scaled logits, probabilities, exponential noise, sorted values and their cumulative sums (4 B each), the sort
# order (int64), and some slack.
SAMPLER_BYTES_PER_LOGIT = 40

CPU_MAX_NUM_SEQS = 64
# CPU steps cost about linearly in tokens: 256 prompt tokens keep a running stream's gap near a few decode steps.
CPU_MAX_NUM_BATCHED_TOKENS = 256
CPU_KV_CACHE_BYTES = 512 * MIB
UNPLANNED_MAX_LORAS = 8  # max_loras when nothing is planned (CPU, or an explicit KV cache size)


class MemoryPlanError(ValueError):
    """The configuration cannot fit on the device; the message gives the numbers."""


@dataclass(frozen=True, slots=True)
class Measurements:
    """What start-up measured on the device (bytes)."""

    total: int  # the device's memory
    free_at_start: int  # free before the engine loaded anything (other processes may hold the rest)
    weights: int  # allocated by loading the model: weights and the attention backend's workspace
    activations: int  # added at the peak of one max-size step (max_num_batched_tokens tokens, max_num_seqs rows)
    decode_activations: int  # added at the peak of one max_num_seqs-row decode step (sizes the CUDA graph pool)
    non_torch: int  # device memory in use that torch's allocator does not count (CUDA context, library workspaces)
    step_graph_activations: int = 0  # added at the peak of one step of the largest token count captured in pieces


@dataclass(frozen=True, slots=True)
class PlanInputs:
    """What the plan is for: settings already resolved, except max_loras (None: chosen by the plan)."""

    utilization: float
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int
    kv_bytes_per_block: int
    max_loras: int | None  # 0: LoRA off
    lora_slot_bytes: int  # one adapter slot's A/B buffers over every wrapped projection and vocabulary matrix
    lora_workspace_bytes: int  # per-step LoRA intermediates at max_num_batched_tokens
    vocab_size: int
    logits_element_bytes: int
    graph_batch_sizes: tuple[int, ...]  # () when decode steps are not captured
    graphs_with_lora: bool  # each batch size holds a LoRA and a LoRA-free graph
    graph_buffer_bytes: int = 0  # what the attention backend allocates per captured batch size (its plan buffers)
    graph_page_index_bytes: int = 0  # ... and per captured row and KV page of a max_model_len sequence
    full_module_bytes: int = 0  # every full-module slot's copies of the vocabulary layers (modules_to_save)
    graph_step_tokens: tuple[int, ...] = ()  # token counts of steps captured in pieces (kvrun.runtime.step_graphs)
    stream_bytes_per_token: int = 0  # a captured piece's last hidden state and residual, per token
    attention_buffer_bytes_per_token: int = 0  # the pieces' query and attention-output buffers, per token


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    budget: int
    weights: int
    activations: int
    sampler: int
    graphs: int
    non_torch: int
    max_loras: int
    lora: int  # slots + workspace + full-module slots
    kv_cache: int  # num_blocks × block bytes
    num_blocks: int
    block_size: int
    max_num_seqs: int

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self) -> str:
        return (
            f"memory plan: budget {_gib(self.budget)}; weights {_gib(self.weights)}, activations "
            f"{_gib(self.activations)}, sampler {_gib(self.sampler)}, CUDA graphs {_gib(self.graphs)}, outside torch "
            f"{_gib(self.non_torch)}, LoRA {self.max_loras} slots {_gib(self.lora)}, KV cache {_gib(self.kv_cache)} = "
            f"{self.num_blocks} blocks = {self.kv_tokens} tokens; max_num_seqs {self.max_num_seqs}"
        )


def sampler_bytes(max_num_seqs: int, vocab_size: int) -> int:
    return max_num_seqs * vocab_size * SAMPLER_BYTES_PER_LOGIT


def graph_pool_bytes(inputs: PlanInputs, decode_activations: int, step_activations: int = 0) -> int:
    """Captured graphs share one pool: the largest step's intermediates, plus what every graph keeps."""
    if not inputs.graph_batch_sizes:
        return 0
    graphs_per_size = 2 if inputs.graphs_with_lora else 1
    kept_logits = sum(inputs.graph_batch_sizes) * inputs.vocab_size * inputs.logits_element_bytes * graphs_per_size
    kept_streams = sum(inputs.graph_step_tokens) * inputs.stream_bytes_per_token * graphs_per_size
    buffers = len(inputs.graph_batch_sizes) * inputs.graph_buffer_bytes
    pages_per_seq = -(-inputs.max_model_len // inputs.block_size)
    buffers += sum(inputs.graph_batch_sizes) * pages_per_seq * inputs.graph_page_index_bytes
    buffers += max(inputs.graph_step_tokens, default=0) * inputs.attention_buffer_bytes_per_token
    peak = max(decode_activations, step_activations if inputs.graph_step_tokens else 0)
    return peak + kept_logits + kept_streams + buffers + CAPTURE_STREAM_WORKSPACE + GRAPH_POOL_SEGMENT


def plan_gpu_memory(measured: Measurements, inputs: PlanInputs) -> MemoryPlan:
    budget = int(inputs.utilization * measured.total)
    if measured.free_at_start < budget:
        raise MemoryPlanError(
            f"gpu_memory_utilization {inputs.utilization:g} asks for {_gib(budget)} of the device's "
            f"{_gib(measured.total)}, but only {_gib(measured.free_at_start)} was free at start-up (other processes "
            f"hold the rest): lower gpu_memory_utilization to at most {_fraction_below(measured)}"
        )
    sampler = sampler_bytes(inputs.max_num_seqs, inputs.vocab_size)
    graphs = graph_pool_bytes(inputs, measured.decode_activations, measured.step_graph_activations)
    fixed = measured.weights + measured.activations + sampler + graphs + measured.non_torch + ALLOCATOR_SLACK
    left = budget - fixed
    sequence_kv = -(-inputs.max_model_len // inputs.block_size) * inputs.kv_bytes_per_block
    max_loras = _choose_max_loras(inputs, left, sequence_kv)
    lora = max_loras * inputs.lora_slot_bytes + (inputs.lora_workspace_bytes if max_loras else 0)
    lora += inputs.full_module_bytes if max_loras else 0
    num_blocks = max(0, (left - lora) // inputs.kv_bytes_per_block)
    if num_blocks * inputs.kv_bytes_per_block < sequence_kv:
        fitting_tokens = num_blocks * inputs.block_size
        raise MemoryPlanError(
            f"max_model_len {inputs.max_model_len} needs {_gib(sequence_kv)} of KV cache for one sequence, but "
            f"{_gib(max(0, left - lora))} is left: budget {_gib(budget)} (gpu_memory_utilization "
            f"{inputs.utilization:g} of {_gib(measured.total)}) - weights {_gib(measured.weights)} - activations "
            f"{_gib(measured.activations)} - sampler {_gib(sampler)} - CUDA graphs {_gib(graphs)} - outside torch "
            f"{_gib(measured.non_torch)} - allocator slack {_gib(ALLOCATOR_SLACK)} - LoRA {max_loras} slots "
            f"{_gib(lora)}. Lower max_model_len (at most "
            f"{fitting_tokens} tokens fit), max_loras, max_lora_rank or max_num_batched_tokens, or raise "
            f"gpu_memory_utilization"
        )
    return MemoryPlan(
        budget=budget, weights=measured.weights, activations=measured.activations, sampler=sampler, graphs=graphs,
        non_torch=measured.non_torch, max_loras=max_loras, lora=lora, kv_cache=num_blocks * inputs.kv_bytes_per_block,
        num_blocks=num_blocks, block_size=inputs.block_size, max_num_seqs=inputs.max_num_seqs,
    )  # fmt: skip


def _choose_max_loras(inputs: PlanInputs, left: int, sequence_kv: int) -> int:
    if inputs.max_loras is not None:
        return inputs.max_loras
    slot = inputs.lora_slot_bytes
    by_share = int(LORA_SHARE * max(0, left) // slot)
    # slots that still leave one sequence's KV
    by_kv = (left - inputs.lora_workspace_bytes - inputs.full_module_bytes - sequence_kv) // slot
    return max(1, min(by_share, by_kv, inputs.max_num_seqs, MAX_AUTO_LORAS))


def _fraction_below(measured: Measurements) -> str:
    """The largest utilization, in hundredths, whose budget the free memory covers (rounded down: one that rounds up
    would be refused again)."""
    return f"{math.floor(100 * measured.free_at_start / measured.total) / 100:.2f}"


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.2f} GiB"
