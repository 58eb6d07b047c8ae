"""Engine configuration: frozen, slotted dataclasses, validated once at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The decoder's shape, read from an HF config.json (Llama family)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    architecture: str
    name: str

    @classmethod
    def from_hf(cls, config: dict, name: str) -> ModelConfig:
        architecture = (config.get("architectures") or ["LlamaForCausalLM"])[0]
        hidden = config["hidden_size"]
        num_heads = config["num_attention_heads"]
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or hidden // num_heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling=config.get("rope_scaling"),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            attention_bias=config.get("attention_bias", False),
            mlp_bias=config.get("mlp_bias", False),
            eos_token_ids=eos_ids,
            bos_token_id=config.get("bos_token_id"),
            architecture=architecture,
            name=name,
        )


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """None means "chosen at start-up" (kvrun.runtime.memory_plan says how)."""

    block_size: int = 16  # tokens per KV page
    num_blocks: int | None = None  # None: from kv_cache_memory_bytes, else the memory plan
    kv_cache_memory_bytes: int | None = None  # None: the GPU memory plan's rest; 512 MiB on CPU
    enable_prefix_caching: bool = True  # share the K/V of full blocks between requests with one prefix and adapter
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory the engine plans to use

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError("kv_cache_memory_bytes must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1]; got {self.gpu_memory_utilization}")


@dataclass(frozen=True, slots=True)
class LoRAConfig:
    max_loras: int | None = None  # adapter slots resident in the model at once; 0: LoRA off; None: memory plan
    max_lora_rank: int = 64
    max_cpu_loras: int = 64  # parsed adapters kept in host memory (raised to max_loras when that is larger)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __post_init__(self) -> None:
        if self.max_loras is not None and self.max_loras < 0:
            raise ValueError("max_loras must be >= 0")
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

    def __post_init__(self) -> None:
        if (self.max_num_seqs is not None and self.max_num_seqs < 1) or (
            self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1
        ):
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
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
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

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
