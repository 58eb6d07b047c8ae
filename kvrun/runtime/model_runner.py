"""ScheduledBatch → ForwardBatch → model forward → last-token logits (the engine samples them)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kvrun.config import EngineConfig, ModelConfig
from kvrun.runtime.attention import select_backend
from kvrun.runtime.attention.base import AttentionMetadata
from kvrun.runtime.forward_batch import BASE_SLOT, ForwardBatch, LoRABatchInfo, ScheduledBatch
from kvrun.runtime.kv_cache import allocate_kv_cache
from kvrun.runtime.loader import iter_weights, read_config
from kvrun.runtime.models.registry import model_class

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model_dir: Path, config: EngineConfig, model_name: str) -> None:
        self.device = config.torch_device()
        self.dtype = config.torch_dtype()
        self.model_config = ModelConfig.from_hf(read_config(model_dir), model_name)
        self.max_model_len = min(
            config.scheduler.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        self.block_size = config.cache.block_size
        self._init_model(model_dir, config.load_format)
        self.num_blocks, self.kv_cache = 0, None  # sized by the engine's memory plan (kvrun.runtime.memory_profile)
        self.graphs = None  # DecodeGraphs, captured by capture_decode_graphs once adapters are wired in

    def _init_model(self, model_dir: Path, load_format: str) -> None:
        cfg = self.model_config
        self.attention = select_backend(self.device, self.dtype, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        # Build directly in the target dtype and device: an 8B model never exists in fp32 on the way.
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                fused = self.device.type == "cuda"
                model = model_class(cfg.architecture)(cfg, self.attention, self.max_model_len, fused)
        finally:
            torch.set_default_dtype(default_dtype)
        if load_format == "dummy":
            _init_dummy_weights(model)
        else:
            model.load_weights(iter_weights(model_dir))
        self.model = model.eval()

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate the paged KV pool (again: the memory plan profiles steps on a small temporary one first)."""
        self.release_kv_cache()
        self.num_blocks = num_blocks
        # One page past the pool is scratch: padded rows of a captured decode step write there.
        self.kv_cache = allocate_kv_cache(self.model_config, num_blocks + 1, self.block_size, self.dtype, self.device)
        logger.info("KV cache: %d blocks of %d tokens", self.num_blocks, self.block_size)

    def release_kv_cache(self) -> None:
        self.num_blocks, self.kv_cache = 0, None

    def capture_decode_graphs(self, max_batch_size: int, with_lora: bool) -> None:
        """Capture decode steps on CUDA (call after LoRA wrappers are installed: the graphs bake in the modules)."""
        from kvrun.runtime.cuda_graph import DecodeGraphs

        with torch.inference_mode():
            self.graphs = DecodeGraphs(self, max_batch_size, with_lora)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """[len(batch.sampling_requests()), vocab]: the last-token logits of each row that samples, in batch order."""
        if self.graphs is not None and not batch.is_prefill and self.graphs.bucket_for(len(batch.requests)):
            logits = self.graphs.run(batch)
        else:
            forward_batch = self.prepare(batch)
            self.attention.plan(forward_batch.attention)
            logits = self.model(forward_batch, self.kv_cache)
        return logits

    def prepare(self, batch: ScheduledBatch) -> ForwardBatch:
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        qo_indptr, kv_indptr = [0], [0]
        page_indices: list[int] = []
        last_page_lens, seq_lens, query_lens = [], [], []
        for request in batch.requests:
            count = len(request.token_ids)
            seq_len = request.start_position + count
            pages = request.block_table[: (seq_len + self.block_size - 1) // self.block_size]
            input_ids.extend(request.token_ids)
            new_positions = range(request.start_position, seq_len)
            positions.extend(new_positions)
            slot_mapping.extend(pages[p // self.block_size] * self.block_size + p % self.block_size for p in new_positions)
            page_indices.extend(pages)
            qo_indptr.append(qo_indptr[-1] + count)
            kv_indptr.append(kv_indptr[-1] + len(pages))
            last_page_lens.append(seq_len - (len(pages) - 1) * self.block_size)
            seq_lens.append(seq_len)
            query_lens.append(count)

        def tensor(values: list[int], dtype=torch.int32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        def host(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32)

        attention = AttentionMetadata(
            is_prefill=batch.is_prefill,
            qo_indptr=host(qo_indptr),
            kv_indptr=host(kv_indptr),
            kv_page_indices=host(page_indices),
            kv_last_page_len=host(last_page_lens),
            seq_lens=host(seq_lens),
            slot_mapping=tensor(slot_mapping, torch.int64),
            page_size=self.block_size,
            query_lens_host=query_lens,
            seq_lens_host=seq_lens,
        )
        return ForwardBatch(
            input_ids=tensor(input_ids, torch.int64),
            positions=tensor(positions, torch.int64),
            attention=attention,
            logits_indices=tensor(
                [end - 1 for end, request in zip(qo_indptr[1:], batch.requests) if request.samples], torch.int64
            ),
            lora=self._lora_info(batch, query_lens),
        )

    def _lora_info(self, batch: ScheduledBatch, query_lens: list[int]) -> LoRABatchInfo | None:
        slots = [request.adapter_slot for request in batch.requests]
        if all(slot == BASE_SLOT for slot in slots):
            return None
        seg_indptr, seg_slots = [0], []
        for slot, count in zip(slots, query_lens):
            if seg_slots and seg_slots[-1] == slot:
                seg_indptr[-1] += count
            else:
                seg_slots.append(slot)
                seg_indptr.append(seg_indptr[-1] + count)
        return LoRABatchInfo(
            seg_indptr=torch.tensor(seg_indptr, dtype=torch.int32, device=self.device),
            seg_slots=torch.tensor(seg_slots, dtype=torch.int32, device=self.device),
        )


@torch.no_grad()
def _init_dummy_weights(model: torch.nn.Module) -> None:
    """Random weights at HF's initializer scale, so activations stay finite through every layer."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)
