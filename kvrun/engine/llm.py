"""LLM: the offline, vLLM-shaped entry point (`LLM().generate(prompts, params, adapters=...)`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from kvrun.adapters.merge import MergeSpec
from kvrun.adapters.ref import AdapterRef
from kvrun.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from kvrun.engine.engine import LLMEngine
from kvrun.engine.request import RequestOutput
from kvrun.engine.sampling_params import SamplingParams
from kvrun.engine.tokenizer import apply_chat_template


def _default(section: type, name: str):
    """A setting's default, read from the config dataclass that declares it (the one source of truth)."""
    return next(item.default for item in fields(section) if item.name == name)


class LLM:
    """Settings left at None are chosen at start-up for the device (see kvrun.runtime.memory_plan)."""

    def __init__(
        self,
        model: str | None = None,
        *,
        max_loras: int | None = _default(LoRAConfig, "max_loras"),
        max_lora_rank: int = _default(LoRAConfig, "max_lora_rank"),
        max_cpu_loras: int = _default(LoRAConfig, "max_cpu_loras"),
        max_trainable_tokens: int = _default(LoRAConfig, "max_trainable_tokens"),
        max_full_module_slots: int = _default(LoRAConfig, "max_full_module_slots"),
        dtype: str = _default(EngineConfig, "dtype"),
        device: str = _default(EngineConfig, "device"),
        block_size: int = _default(CacheConfig, "block_size"),
        num_blocks: int | None = _default(CacheConfig, "num_blocks"),
        kv_cache_memory_bytes: int | None = _default(CacheConfig, "kv_cache_memory_bytes"),
        gpu_memory_utilization: float = _default(CacheConfig, "gpu_memory_utilization"),
        enable_prefix_caching: bool = _default(CacheConfig, "enable_prefix_caching"),
        max_num_seqs: int | None = _default(SchedulerConfig, "max_num_seqs"),
        max_num_batched_tokens: int | None = _default(SchedulerConfig, "max_num_batched_tokens"),
        max_model_len: int | None = _default(SchedulerConfig, "max_model_len"),
        enable_chunked_prefill: bool = _default(SchedulerConfig, "enable_chunked_prefill"),
        load_format: str = _default(EngineConfig, "load_format"),
        cuda_graphs: bool = _default(EngineConfig, "cuda_graphs"),
        cuda_graph_max_tokens: int = _default(EngineConfig, "cuda_graph_max_tokens"),
        tensor_parallel_size: int = _default(EngineConfig, "tensor_parallel_size"),
        async_scheduling: bool | None = _default(EngineConfig, "async_scheduling"),
    ) -> None:
        config = EngineConfig(
            model=model,
            dtype=dtype,
            device=device,
            load_format=load_format,
            cuda_graphs=cuda_graphs,
            cuda_graph_max_tokens=cuda_graph_max_tokens,
            tensor_parallel_size=tensor_parallel_size,
            async_scheduling=async_scheduling,
            cache=CacheConfig(
                block_size, num_blocks, kv_cache_memory_bytes, enable_prefix_caching, gpu_memory_utilization
            ),
            lora=LoRAConfig(max_loras, max_lora_rank, max(max_cpu_loras, max_loras or 0), max_trainable_tokens,
                            max_full_module_slots),  # fmt: skip
            scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len, enable_chunked_prefill),
        )
        self.engine = LLMEngine(config)

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes now (they also stop when this object is collected)."""
        self.engine.shutdown()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def load_adapter(self, name: str, path: str | Path) -> AdapterRef:
        return self.engine.load_adapter(name, path)

    def unload_adapter(self, name: str) -> AdapterRef:
        return self.engine.unload_adapter(name)

    def merge_adapters(
        self,
        name: str,
        ids: Sequence[str],
        weights: Sequence[float] | None = None,
        merge_strategy: str = "linear",
        density: float = 1.0,
        majority_sign_method: str = "total",
    ) -> AdapterRef:
        """Load under name the merge of the loaded adapters ids, as LoRAX's `merged_adapters` asks for it (weights:
        one per id, default all 1; kvrun.adapters.merge says what each strategy computes). Raises ValueError naming
        what cannot be merged."""
        weights = tuple(weights) if weights else (1.0,) * len(ids)
        spec = MergeSpec(tuple(float(weight) for weight in weights), merge_strategy, density, majority_sign_method)
        return self.engine.merge_adapters(name, list(ids), spec)

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: str | None | Sequence[str | None] = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion in shared batches; outputs come back in prompt order. params: one
        SamplingParams for all or one per prompt (every field is honoured: see SamplingParams). A request that fails
        alone comes back with finish_reason "error" and RequestOutput.error."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        count = len(prompts)
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * count
        adapter_list = list(adapters) if isinstance(adapters, (list, tuple)) else [adapters] * count
        if len(params_list) != count or len(adapter_list) != count:
            raise ValueError("params and adapters must be one value or one per prompt")
        ids: list[str] = []
        finals: dict[str, RequestOutput] = {}
        try:
            for prompt, sampling, adapter in zip(prompts, params_list, adapter_list):
                ids.append(self.engine.add_request(prompt, sampling, adapter).request_id)
            while len(finals) < count:
                for output in self.engine.step():
                    if output.finished:
                        finals[output.request_id] = output
        except BaseException:
            # A bad prompt, a failed step or an interrupt: nothing of this call stays queued or holds KV blocks.
            for request_id in ids:
                if request_id not in finals:
                    self.engine.abort_request(request_id)
            raise
        return [finals[request_id] for request_id in ids]

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: str | None | Sequence[str | None] = None,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [apply_chat_template(self.tokenizer, conversation) for conversation in conversations]
        return self.generate(prompts, params, adapters)
