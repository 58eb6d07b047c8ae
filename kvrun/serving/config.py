"""What `kvrun serve` was asked for: one frozen record the app factory builds everything from."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kvrun.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig


@dataclass(frozen=True, slots=True)
class ServerConfig:
    model: str | None = None  # HF directory or .gguf; None = the bundled SmolLM2
    registry: str | None = None  # registry URL; None = env KVRUN_REGISTRY, else the embedded file registry
    use_registry: bool = True  # False: only adapters loaded through /v1/load_lora_adapter are served
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # the base model's id in /v1 APIs (default: the engine's model name)
    tokenizer: str | None = None  # a tokenizer directory other than the model's
    chat_template: str | None = None  # a Jinja template replacing the tokenizer's
    trust_request_chat_template: bool = False  # run templates requests send (chat_template_kwargs.chat_template)
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, path) adapters loaded at start and kept loaded
    api_key: str | None = None  # required as `Authorization: Bearer` on /v1/* and /generate*
    admin_key: str | None = None  # required for load/unload when set (else the api key guards them)
    max_loras: int | None = None  # adapter slots in the model; None: chosen at start-up (kvrun.runtime.memory_plan)
    max_lora_rank: int = 64
    max_cpu_loras: int = 32  # parsed adapters kept in host memory, and adapter versions known to the engine
    max_trainable_tokens: int = 64  # token rows an adapter's trainable tokens may replace, per vocabulary role
    max_full_module_slots: int = 0  # whole per-adapter embedding/output-layer copies (modules_to_save); 0: refused
    max_num_seqs: int | None = None  # None: 256 on GPU, 64 on CPU
    max_num_batched_tokens: int | None = None  # tokens in one step; None: 512 on GPU, 256 on CPU
    max_model_len: int | None = None
    max_queue: int = 256  # requests allowed to wait beyond the running batch before 429/503
    queue_timeout_s: float = 120.0  # a request not scheduled this long (e.g. no free slot) fails with 503
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None  # None: what the GPU memory plan leaves; 512 MiB on CPU
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    dtype: str = "auto"
    device: str = "auto"
    load_format: str = "auto"  # "dummy": random weights of the config's shapes (GPU benchmarks without downloads)
    cuda_graphs: bool = True
    cuda_graph_max_tokens: int = 2048  # steps with prompt tokens captured in pieces up to this many tokens; 0: eager
    tensor_parallel_size: int = 1  # GPUs (one process each) the model is split over
    async_scheduling: bool | None = None  # launch each step before the last one's tokens reach the host; None: auto
    resolve_ttl_s: float = 30.0  # backstop for cached ref → version resolutions if a change event is missed
    default_max_new_tokens: int = 100  # TGI's default when `max_new_tokens` is absent
    cors_origins: tuple[str, ...] = field(default=())
    log_interval_s: float = 10.0  # a status line this often while requests run; 0 = none
    engine_process: bool = True  # step the engine in its own process (False: in a thread of the server's)

    def __post_init__(self) -> None:
        self._check_engine_flags()
        if self.max_cpu_loras < (self.max_loras or 0):
            raise ValueError(f"--max-cpu-loras ({self.max_cpu_loras}) must be >= --max-loras ({self.max_loras})")
        if not 0 <= self.max_trainable_tokens <= 65536:
            raise ValueError(f"--max-trainable-tokens must be in 0..65536, got {self.max_trainable_tokens}")
        if self.max_full_module_slots < 0:
            raise ValueError(f"--max-full-module-slots must be >= 0, got {self.max_full_module_slots}")
        if self.cuda_graph_max_tokens < 0:
            raise ValueError(f"--cuda-graph-max-tokens must be >= 0, got {self.cuda_graph_max_tokens}")
        if self.max_queue < 0:
            raise ValueError("--max-queue must be >= 0")
        if self.queue_timeout_s <= 0:
            raise ValueError("--queue-timeout must be > 0")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.log_interval_s < 0:
            raise ValueError("--log-interval must be >= 0")
        names = [name for name, _ in self.lora_modules]
        if len(set(names)) != len(names):
            raise ValueError(f"--lora-modules names must differ, got {names}")
        self.engine_config()  # what the engine's own config refuses is refused here, before anything starts

    def _check_engine_flags(self) -> None:
        """The engine's settings as the flags that set them: a bad value is a usage error naming the flag."""
        for flag, value, minimum in (
            ("--block-size", self.block_size, 1), ("--num-blocks", self.num_blocks, 1),
            ("--max-num-seqs", self.max_num_seqs, 1),
            ("--max-num-batched-tokens", self.max_num_batched_tokens, 1), ("--max-model-len", self.max_model_len, 1),
            ("--max-loras", self.max_loras, 0), ("--max-lora-rank", self.max_lora_rank, 1),
        ):  # fmt: skip
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
                raise ValueError(f"{flag} must be an integer >= {minimum}, got {value!r}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError(f"--kv-cache-mib must be >= 1, got {self.kv_cache_memory_bytes / (1 << 20):g}")
        if self.max_lora_rank > 1024:
            raise ValueError(f"--max-lora-rank must be at most 1024, got {self.max_lora_rank}")
        utilization = self.gpu_memory_utilization
        if not isinstance(utilization, (int, float)) or isinstance(utilization, bool) or not 0 < utilization <= 1:
            raise ValueError(f"--gpu-memory-utilization must be a number in (0, 1], got {utilization!r}")
        if self.max_num_seqs and self.max_num_batched_tokens and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"--max-num-batched-tokens ({self.max_num_batched_tokens}) must be >= --max-num-seqs "
                f"({self.max_num_seqs}): every running request needs a token of each step's budget"
            )

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            tokenizer=self.tokenizer,
            dtype=self.dtype,
            device=self.device,
            load_format=self.load_format,
            cuda_graphs=self.cuda_graphs,
            cuda_graph_max_tokens=self.cuda_graph_max_tokens,
            tensor_parallel_size=self.tensor_parallel_size,
            async_scheduling=self.async_scheduling,
            cache=CacheConfig(self.block_size, self.num_blocks, self.kv_cache_memory_bytes, self.enable_prefix_caching,
                              self.gpu_memory_utilization),
            lora=LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras, self.max_trainable_tokens,
                            self.max_full_module_slots),
            scheduler=SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len,
                                      self.enable_chunked_prefill, online=True),
        )  # fmt: skip

    def resolved(self, engine: EngineConfig) -> ServerConfig:
        """This config with the values the engine chose at start-up in place of the automatic ones."""
        return replace(
            self, max_loras=engine.lora.max_loras, max_cpu_loras=engine.lora.max_cpu_loras,
            max_num_seqs=engine.scheduler.max_num_seqs, max_num_batched_tokens=engine.scheduler.max_num_batched_tokens,
            num_blocks=engine.cache.num_blocks,
        )  # fmt: skip
