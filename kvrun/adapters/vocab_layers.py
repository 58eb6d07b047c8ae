"""LoRA on the vocabulary matrix: the token embedding's (PEFT's embedding LoRA) and the output layer's (a linear LoRA
on the rows whose logits are computed), both per row of a mixed batch."""

from __future__ import annotations

import torch
from torch import nn

from kvrun.adapters.layers import LinearWithLoRA, SliceWeights
from kvrun.punica import LoRAOps
from kvrun.runtime.forward_batch import ForwardBatch, LoRABatchInfo
from kvrun.runtime.layers.vocab import HEAD, OutputHead, VocabParallelEmbedding


class EmbeddingLoRA(nn.Module):
    """PEFT's embedding LoRA: a row using slot s gets emb(x) + scaling_s · A_s^T[x] B_s^T, with lora_embedding_A
    [r, vocab] and lora_embedding_B [width, r]. The shrink is a row lookup in A^T (stored [slots, vocab, max_rank]
    so one token reads max_rank contiguous values), scaled per row; the expand is the segment op every projection
    uses (Triton on CUDA).

    Under tensor parallelism every rank holds the whole A and B and adds the delta after the embedding's all-reduce,
    so the ranks stay identical and no communication is added."""

    def __init__(self, vocab_size: int, width: int, num_slots: int, max_rank: int, ops: LoRAOps, like: torch.Tensor):
        super().__init__()
        options = dict(dtype=like.dtype, device=like.device)
        self.lora_a = [torch.zeros(num_slots, vocab_size, max_rank, **options)]  # A^T per slot (one slice)
        self.lora_b = [torch.zeros(num_slots, max_rank, width, **options)]  # B^T per slot, as the expand reads it
        self.ranks = torch.zeros(1, num_slots, dtype=torch.int32, device=like.device)
        self.scalings = torch.zeros(num_slots, dtype=torch.float32, device=like.device)
        self.ops = ops
        self.shrink_dtype = torch.float32 if like.is_cuda else like.dtype  # what the expand reads (LinearWithLoRA)

    def set_slot(self, slot: int, weights: dict[str, SliceWeights]) -> None:
        self.lora_a[0][slot].zero_()
        self.lora_b[0][slot].zero_()
        entry = next(iter(weights.values()), None)
        if entry is None:
            self.ranks[0, slot] = 0
            self.scalings[slot] = 0.0
            return
        rank = entry.a.shape[0]
        self.lora_a[0][slot, :, :rank].copy_(entry.a.T, non_blocking=True)
        self.lora_b[0][slot, :rank].copy_(entry.b.T, non_blocking=True)
        self.ranks[0, slot] = rank
        self.scalings[slot] = entry.scaling

    def add_delta(self, out: torch.Tensor, input_ids: torch.Tensor, lora: LoRABatchInfo) -> torch.Tensor:
        """out [tokens, width] += each token's delta (base rows unchanged)."""
        lengths = lora.seg_indptr[1:] - lora.seg_indptr[:-1]
        token_slots = torch.repeat_interleave(lora.seg_slots, lengths, output_size=input_ids.shape[0])
        slots = token_slots.clamp(min=0)
        scale = self.scalings[slots] * (token_slots >= 0)
        shrunk = self.lora_a[0][slots, input_ids].to(self.shrink_dtype) * scale.unsqueeze(-1).to(self.shrink_dtype)
        self.ops.sgmv_expand(shrunk.unsqueeze(0), self.lora_b, lora.seg_indptr, lora.seg_slots, self.ranks, out, [0])
        return out


class VocabWithLoRA(nn.Module):
    """A vocabulary matrix with the LoRA of each role it plays: `embedding` for token ids → hidden, `head` (a
    LinearWithLoRA over the matrix's OutputHead) for hidden → logits. A tied embedding has both."""

    def __init__(
        self, base: VocabParallelEmbedding, num_slots: int, max_rank: int, ops: LoRAOps, *, embedding: bool,
        head: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        self.base = base
        weight = base.weight
        self.embedding = None
        if embedding:
            self.embedding = EmbeddingLoRA(base.vocab_size, weight.shape[1], num_slots, max_rank, ops, weight)
        self.head = LinearWithLoRA(OutputHead(base, HEAD), num_slots, max_rank, ops) if head else None

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor, lora: LoRABatchInfo | None = None) -> torch.Tensor:
        out = self.base(input_ids)
        if lora is None or self.embedding is None:
            return out
        return self.embedding.add_delta(out, input_ids, lora)

    def logits(self, hidden: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        if self.head is None:
            return self.base.logits(hidden)
        lora = None if batch is None or batch.lora is None else batch.lora.for_rows(batch.logits_indices)
        return self.head(hidden, lora)

    def holds(self, parameter: str, full: torch.Tensor) -> bool:
        """Whether `full`, a checkpoint's whole weight [vocab, width] or bias [vocab] of this matrix, is the one
        served (this rank's rows of it)."""
        served = getattr(self.base, parameter)
        if served is None:
            return False
        return torch.equal(self.base._shard(full.to(device=served.device, dtype=served.dtype)), served)
