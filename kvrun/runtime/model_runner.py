"""ScheduledBatch → ForwardBatch → model forward → last-token logits (the engine samples them)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kvrun.config import EngineConfig
from kvrun.runtime.attention import select_backend
from kvrun.runtime.distributed.group import TensorParallel, local_alibi_slopes, local_heads
from kvrun.runtime.forward_batch import ForwardBatch, LoRABatchInfo, ScheduledBatch
from kvrun.runtime.kv_cache import allocate_kv_cache
from kvrun.runtime.loader import iter_weights, read_config
from kvrun.runtime.models.decoder import CausalLM
from kvrun.runtime.models.registry import read_model_config
from kvrun.runtime.models.weights import load_weights
from kvrun.runtime.step_layout import attention_metadata, fill_pending, layout_step, to_device

logger = logging.getLogger(__name__)


class ModelRunner:
    """The model on one device. tp: this process's rank of a tensor-parallel group (it then holds that rank's shard
    of every weight and of the KV cache; kvrun.runtime.distributed drives the ranks in step)."""

    workers = None  # the other ranks' processes, when this is rank 0 of a tensor-parallel group

    def __init__(self, model_dir: Path, config: EngineConfig, model_name: str, tp: TensorParallel | None = None) -> None:
        self.tp = tp
        self.device = config.torch_device()
        self.dtype = config.torch_dtype()
        self.model_config = read_model_config(read_config(model_dir), model_name)
        positions = self.model_config.max_position_embeddings
        if (config.scheduler.max_model_len or 0) > positions:
            raise ValueError(
                f"max_model_len {config.scheduler.max_model_len} is longer than the model's context: {positions} "
                f"positions (max_position_embeddings in its config); leave it unset or lower it"
            )
        self.max_model_len = config.scheduler.max_model_len or positions
        self.block_size = config.cache.block_size
        self._init_model(model_dir, config.load_format)
        self.num_blocks, self.kv_cache = 0, None  # sized by the engine's memory plan (kvrun.runtime.memory_profile)
        self.graphs = None  # DecodeGraphs, captured by capture_graphs once adapters are wired in
        self.step_graphs = None  # StepGraphs (steps with prompt tokens, in pieces), likewise

    def _init_model(self, model_dir: Path, load_format: str) -> None:
        cfg = self.model_config
        num_heads, self.num_kv_heads = local_heads(cfg, self.tp)
        self.attention = select_backend(
            self.device, self.dtype, num_heads, self.num_kv_heads, cfg.head_dim, cfg.attention_variants,
            local_alibi_slopes(cfg, self.tp),
        )
        # Build directly in the target dtype and device: an 8B model never exists in fp32 on the way.
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = CausalLM(cfg, self.attention, self.max_model_len, self.device.type == "cuda", self.tp)
        finally:
            torch.set_default_dtype(default_dtype)
        if load_format == "dummy":
            _init_dummy_weights(model)
        else:
            load_weights(model, iter_weights(model_dir), cfg.architecture)
        self.model = model.eval()
        self.needs_token_seq_lens = model.needs_token_seq_lens

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate the paged KV pool (again: the memory plan profiles steps on a small temporary one first)."""
        self.kv_cache = None  # the old pool goes before the new one is allocated
        self.num_blocks = num_blocks
        # One page past the pool is scratch: padded rows of a captured decode step write there.
        self.kv_cache = allocate_kv_cache(
            self.model_config, num_blocks + 1, self.block_size, self.dtype, self.device, self.num_kv_heads
        )
        logger.info("KV cache: %d blocks of %d tokens", self.num_blocks, self.block_size)

    def release_kv_cache(self) -> None:
        self.num_blocks, self.kv_cache = 0, None

    def shutdown(self) -> None:
        """Release what outlives the object on its own (worker processes under tensor parallelism; nothing here)."""

    def capture_graphs(self, max_batch_size: int, max_step_tokens: int, with_lora: bool) -> None:
        """Capture on CUDA (after LoRA wrappers are installed: the graphs bake in the modules) decode steps of up to
        max_batch_size rows whole, and steps with prompt tokens of up to max_step_tokens tokens in pieces between
        the attention calls (0: those run eagerly)."""
        from kvrun.runtime.cuda_graph import DecodeGraphs
        from kvrun.runtime.step_graphs import StepGraphs

        stream = torch.cuda.Stream(self.device)  # one side stream for every capture
        with torch.inference_mode():
            if max_step_tokens:  # first: the largest intermediates, which the decode graphs' pool then reuses
                self.step_graphs = StepGraphs(self, max_step_tokens, with_lora, stream)
            pool = self.step_graphs.pool if self.step_graphs is not None else None
            self.graphs = DecodeGraphs(self, max_batch_size, with_lora, stream, pool)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, previous: torch.Tensor | None = None) -> torch.Tensor:
        """[len(batch.sampling_requests()), vocab]: the last-token logits of each row that samples, in batch order.
        previous: the last step's sampled tokens on the device, for rows whose token is not on the host yet."""
        if not batch.full_copies:  # a whole layer copy is read by an eager step only
            if self.graphs is not None and not batch.is_prefill and self.graphs.bucket_for(len(batch.requests)):
                return self.graphs.run(batch, previous)
            if self.step_graphs is not None and self.step_graphs.bucket_for(batch.num_tokens):
                return self.step_graphs.run(batch, previous)
        forward_batch = self.prepare(batch, previous)
        self.attention.plan(forward_batch.attention)
        return self.model(forward_batch, self.kv_cache)

    def prepare(self, batch: ScheduledBatch, previous: torch.Tensor | None = None) -> ForwardBatch:
        layout = layout_step(batch.requests, self.block_size)

        def tensor(values: list[int], dtype=torch.int64) -> torch.Tensor:
            return to_device(values, dtype, self.device)

        input_ids = tensor(layout.input_ids)
        fill_pending(input_ids, layout, previous)
        return ForwardBatch(
            input_ids=input_ids,
            positions=tensor(layout.positions),
            attention=attention_metadata(layout, batch.is_prefill, self.block_size, tensor(layout.slot_mapping)),
            logits_indices=tensor(layout.logits_indices),
            lora=LoRABatchInfo(tensor(layout.seg_indptr, torch.int32), tensor(layout.seg_slots, torch.int32),
                               batch.full_copies) if layout.uses_lora else None,
            token_seq_lens=tensor(layout.token_seq_lens) if self.needs_token_seq_lens else None,
        )  # fmt: skip


@torch.no_grad()
def _init_dummy_weights(model: torch.nn.Module) -> None:
    """Random weights at HF's initializer scale, so activations stay finite through every layer."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, param in model.named_parameters():
        if param.dim() == 1 or "norm" in name:
            param.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)
