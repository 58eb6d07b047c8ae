"""Engine configuration: frozen, slotted dataclasses, validated once at start-up."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value, minimum: int, optional: bool = True) -> None:
    """Refuse a value that is not an integer >= minimum (None passes where the setting is optional)."""
    if value is None and optional:
        return
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """None means "chosen at start-up" (kvrun.runtime.memory_plan says how)."""

    block_size: int = 16  # tokens per KV page
    num_blocks: int | None = None  # None: from kv_cache_memory_bytes, else the memory plan
    kv_cache_memory_bytes: int | None = None  # None: the GPU memory plan's rest; 512 MiB on CPU
    enable_prefix_caching: bool = True  # share the K/V of full blocks between requests with one prefix and adapter
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory the engine plans to use

    def __post_init__(self) -> None:
        _check_int("block_size", self.block_size, 1, optional=False)
        _check_int("num_blocks", self.num_blocks, 1)
        _check_int("kv_cache_memory_bytes", self.kv_cache_memory_bytes, 1)
        utilization = self.gpu_memory_utilization
        if not isinstance(utilization, numbers.Real) or isinstance(utilization, bool) or not 0.0 < utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be a number in (0, 1]; got {utilization!r}")


@dataclass(frozen=True, slots=True)
class LoRAConfig:
    max_loras: int | None = None  # adapter slots resident in the model at once; 0: LoRA off; None: memory plan
    max_lora_rank: int = 64
    max_cpu_loras: int = 64  # parsed adapters kept in host memory (raised to max_loras when that is larger)
    # per adapter slot and vocabulary role, the token rows an adapter's trainable tokens may replace (PEFT's
    # trainable_token_indices); 0: adapters with trainable tokens are refused
    max_trainable_tokens: int = 64
    # whole per-adapter copies of the token embedding and output layer (PEFT's modules_to_save), in slots of their own
    # (one copy of each layer per slot); 0: adapters with modules_to_save are refused
    max_full_module_slots: int = 0

    def __post_init__(self) -> None:
        _check_int("max_loras", self.max_loras, 0)
        _check_int("max_lora_rank", self.max_lora_rank, 1, optional=False)
        _check_int("max_cpu_loras", self.max_cpu_loras, 0, optional=False)
        if not 0 <= self.max_trainable_tokens <= 65536 or self.max_full_module_slots < 0:
            raise ValueError("max_trainable_tokens must be in 0..65536 and max_full_module_slots >= 0")
        if not 1 <= self.max_lora_rank <= 1024:
            raise ValueError("max_lora_rank must be in 1..1024")
        if self.max_cpu_loras < (self.max_loras or 0):
            raise ValueError("max_cpu_loras must be >= max_loras")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """None means "chosen at start-up for the device" (kvrun.runtime.memory_plan: GPU and CPU defaults)."""

    max_num_seqs: int | None = None  # requests running at once (rows of one step)
    max_num_batched_tokens: int | None = None  # tokens in one step: a token per decoding request, then prompt chunks
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_chunked_prefill: bool = True  # False: a prompt runs whole in one step (the step's first may exceed the budget)
    # A server's engine (streams wait on every step) rather than an offline batch: on GPU the default step budget is
    # smaller, so prompts arriving mid-stream delay running streams less (vLLM's usage-context defaults likewise).
    online: bool = False

    def __post_init__(self) -> None:
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _check_int("max_model_len", self.max_model_len, 1)
        if self.max_num_seqs and self.max_num_batched_tokens and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}): every running request needs a token of each step's budget"
            )


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str | None = None  # HF directory or .gguf; None = bundled SmolLM2
    tokenizer: str | None = None  # a tokenizer directory other than the model's (vLLM's --tokenizer)
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    load_format: str = "auto"  # "dummy": random weights of the config's shapes (benchmarks; nothing to download)
    cuda_graphs: bool = True  # capture decode steps per batch-size bucket on CUDA
    # ... and steps with prompt tokens of up to this many tokens (capped by the step budget), in pieces between the
    # attention calls; 0: those run eagerly
    cuda_graph_max_tokens: int = 2048
    # schedule and launch each step before the previous step's tokens reach the host (see LLMEngine.step); None: on
    # for one CUDA device, off on CPU (nothing to overlap: the forward pass runs on the host) and under tensor
    # parallelism (it works there, rank 0 broadcasting the sampled tokens to the workers, but is not yet measured
    # on GPUs: opt in with True)
    async_scheduling: bool | None = None
    seed: int = 0
    tensor_parallel_size: int = 1  # devices (one process each) the model is split over
    cache: CacheConfig = field(default_factory=CacheConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1; got {self.tensor_parallel_size!r}")
        if not isinstance(self.cuda_graph_max_tokens, int) or self.cuda_graph_max_tokens < 0:
            raise ValueError(f"cuda_graph_max_tokens must be an integer >= 0; got {self.cuda_graph_max_tokens!r}")

    def graph_step_tokens(self) -> int:
        """The most tokens of a step with prompt tokens that is captured (in pieces); 0: none is. Call on a config
        whose step budget is resolved."""
        if not self.cuda_graphs:
            return 0
        return min(self.cuda_graph_max_tokens, self.scheduler.max_num_batched_tokens)

    def resolved_async_scheduling(self) -> bool:
        if self.async_scheduling is not None:
            return self.async_scheduling
        return self.torch_device().type == "cuda" and self.tensor_parallel_size == 1

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if self.dtype not in dtypes:
            raise ValueError(f"dtype must be one of auto, {', '.join(dtypes)}; got {self.dtype!r}")
        return dtypes[self.dtype]
