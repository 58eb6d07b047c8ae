"""What an adapter changes in the vocabulary matrix, per row of a mixed batch: LoRA on the token embedding (PEFT's
embedding LoRA) and on the output layer (a linear LoRA on the rows whose logits are computed); trainable tokens
(PEFT's trainable_token_indices: a few of the matrix's rows replaced); whole copies (PEFT's modules_to_save)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kvrun.adapters.layers import LinearWithLoRA, SliceWeights
from kvrun.punica import LoRAOps
from kvrun.runtime.forward_batch import ForwardBatch, LoRABatchInfo
from kvrun.runtime.layers.vocab import EMBEDDING, HEAD, OutputHead, VocabParallelEmbedding


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
        token_slots = lora.token_slots(input_ids.shape[0])
        slots = token_slots.clamp(min=0)
        scale = self.scalings[slots] * (token_slots >= 0)
        shrunk = self.lora_a[0][slots, input_ids].to(self.shrink_dtype) * scale.unsqueeze(-1).to(self.shrink_dtype)
        self.ops.sgmv_expand(shrunk.unsqueeze(0), self.lora_b, lora.seg_indptr, lora.seg_slots, self.ranks, out, [0])
        return out


class TokenRows(nn.Module):
    """PEFT's trainable tokens in one role of a vocabulary matrix: per slot, up to max_tokens token ids whose rows
    replace the matrix's own (as embeddings, or as the output layer's rows of their logits). The lookups are
    fixed-shape gathers, so a CUDA graph replays them; every rank holds the whole rows (applied after the embedding's
    all-reduce and the logits' all-gather)."""

    def __init__(self, num_slots: int, max_tokens: int, like: torch.Tensor) -> None:
        super().__init__()
        self.ids = torch.full((num_slots, max_tokens), -1, dtype=torch.int64, device=like.device)  # -1: none
        self.rows = torch.zeros(num_slots, max_tokens, like.shape[1], dtype=like.dtype, device=like.device)

    @property
    def max_tokens(self) -> int:
        return self.ids.shape[1]

    def set_slot(self, slot: int, entry: tuple[tuple[int, ...], torch.Tensor] | None) -> None:
        self.ids[slot].fill_(-1)
        self.rows[slot].zero_()
        if entry is None:
            return
        ids, rows = entry
        if len(ids) > self.max_tokens:
            raise ValueError(f"{len(ids)} trainable tokens, over this engine's max_trainable_tokens {self.max_tokens}")
        self.ids[slot, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        self.rows[slot, : len(ids)].copy_(rows, non_blocking=True)

    def embed(self, out: torch.Tensor, input_ids: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
        """out [tokens, width] with each token's row replaced where its slot (-1: base) trains that token."""
        slots = token_slots.clamp(min=0)
        hits = (self.ids[slots] == input_ids.unsqueeze(-1)) & (token_slots >= 0).unsqueeze(-1)
        rows = self.rows[slots, hits.int().argmax(-1)]
        return torch.where(hits.any(-1, keepdim=True), rows.to(out.dtype), out)

    def logits(self, logits: torch.Tensor, hidden: torch.Tensor, row_slots: torch.Tensor) -> torch.Tensor:
        """logits [rows, vocab] with each row's trained tokens' logits recomputed from their rows. One matmul against
        every slot's rows, then each row picks its slot's; the ids of a slot fill its first entries, so a padded
        entry rewrites the first one's column with the same value (or column 0 with its own value)."""
        num_slots, max_tokens, width = self.rows.shape
        scores = (hidden.to(self.rows.dtype) @ self.rows.view(-1, width).T).view(-1, num_slots, max_tokens)
        slots = row_slots.clamp(min=0).long()
        scores = scores[torch.arange(scores.shape[0], device=scores.device), slots].to(logits.dtype)
        ids = self.ids[slots]
        valid = (ids >= 0) & (row_slots >= 0).unsqueeze(-1)
        first = valid[:, :1]
        columns = torch.where(valid, ids, torch.where(first, ids[:, :1], 0))
        values = torch.where(valid, scores, torch.where(first, scores[:, :1], logits[:, :1]))
        return logits.scatter_(1, columns, values)


class FullCopies(nn.Module):
    """PEFT's modules_to_save in one role of a vocabulary matrix: whole per-adapter copies of the matrix (and its
    bias), in `num_copies` copy slots of their own; `of_slot` maps an adapter slot to its copy (-1: none). Rank r
    holds its rows of each copy, as of the base matrix. Steps with a row using a copy run eagerly
    (LoRABatchInfo.full_copies), so the copies cost nothing in the steps without one."""

    def __init__(self, base: VocabParallelEmbedding, num_slots: int, num_copies: int) -> None:
        super().__init__()
        weight = base.weight
        self.base = base
        self.weights = torch.zeros(num_copies, *weight.shape, dtype=weight.dtype, device=weight.device)
        self.biases = None
        if base.bias is not None:
            self.biases = torch.zeros(num_copies, *base.bias.shape, dtype=weight.dtype, device=weight.device)
        self.of_slot = torch.full((num_slots,), -1, dtype=torch.int64, device=weight.device)

    def write(self, copy: int, parts: dict[str, torch.Tensor]) -> None:
        self.weights[copy].copy_(self.base._shard(parts["weight"]), non_blocking=True)
        if self.biases is not None:
            self.biases[copy].copy_(self.base._shard(parts["bias"]), non_blocking=True)

    def embed(self, out: torch.Tensor, input_ids: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
        copies = self.of_slot[token_slots.clamp(min=0)].masked_fill(token_slots < 0, -1)
        local = input_ids - self.base.start
        outside = (local < 0) | (local >= self.base.num_local)
        rows = self.weights[copies.clamp(min=0), local.clamp(0, self.base.num_local - 1)]
        if self.base.tp is not None:
            rows = self.base.tp.all_reduce(rows.masked_fill(outside.unsqueeze(-1), 0.0))
        return torch.where((copies >= 0).unsqueeze(-1), rows, out)

    def logits(self, logits: torch.Tensor, hidden: torch.Tensor, row_slots: torch.Tensor) -> torch.Tensor:
        copies = self.of_slot[row_slots.clamp(min=0)].masked_fill(row_slots < 0, -1)
        for copy in copies.unique().tolist():  # the same on every rank: they gather in the same order
            if copy < 0:
                continue
            rows = (copies == copy).nonzero().squeeze(1)
            bias = None if self.biases is None else self.biases[copy]
            logits[rows] = self.base.gather(F.linear(hidden[rows], self.weights[copy], bias)).to(logits.dtype)
        return logits


class VocabWithLoRA(nn.Module):
    """A vocabulary matrix with what adapters change in each role it plays: `embedding` for token ids → hidden,
    `head` (a LinearWithLoRA over the matrix's OutputHead) for hidden → logits, a tied embedding both; per role, the
    trainable tokens (`tokens`, with max_tokens > 0) and whole copies (`copies`, with num_copies > 0)."""

    def __init__(
        self, base: VocabParallelEmbedding, num_slots: int, max_rank: int, ops: LoRAOps, *, embedding: bool,
        head: bool, max_tokens: int = 0, num_copies: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.base = base
        weight = base.weight
        self.embedding = None
        if embedding:
            self.embedding = EmbeddingLoRA(base.vocab_size, weight.shape[1], num_slots, max_rank, ops, weight)
        self.head = LinearWithLoRA(OutputHead(base, HEAD), num_slots, max_rank, ops) if head else None
        roles = [role for role, plays in ((EMBEDDING, embedding), (HEAD, head)) if plays]
        self.tokens = nn.ModuleDict({role: TokenRows(num_slots, max_tokens, weight) for role in roles if max_tokens})
        self.copies = nn.ModuleDict({role: FullCopies(base, num_slots, num_copies) for role in roles if num_copies})

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor, lora: LoRABatchInfo | None = None) -> torch.Tensor:
        out = self.base(input_ids)
        if lora is None:
            return out
        if self.embedding is not None:
            out = self.embedding.add_delta(out, input_ids, lora)
        replacing = self._replacing(EMBEDDING, lora)
        token_slots = lora.token_slots(input_ids.shape[0]) if replacing else None
        for part in replacing:
            out = part.embed(out, input_ids, token_slots)
        return out

    def logits(self, hidden: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        lora = None if batch is None or batch.lora is None else batch.lora.for_rows(batch.logits_indices)
        logits = self.base.logits(hidden) if self.head is None else self.head(hidden, lora)
        replacing = self._replacing(HEAD, lora) if lora is not None else []
        row_slots = lora.token_slots(hidden.shape[0]) if replacing else None
        for part in replacing:
            logits = part.logits(logits, hidden, row_slots)
        return logits

    def _replacing(self, role: str, lora: LoRABatchInfo) -> list[TokenRows | FullCopies]:
        """What replaces rows of the matrix in `role` this step: trainable tokens, and the layer copies of a step
        that uses them."""
        parts = [self.tokens[role]] if role in self.tokens else []
        return parts + [self.copies[role]] if lora.full_copies and role in self.copies else parts

    def holds(self, parameter: str, full: torch.Tensor) -> bool:
        """Whether `full`, a checkpoint's whole weight [vocab, width] or bias [vocab] of this matrix, is the one
        served (this rank's rows of it)."""
        served = getattr(self.base, parameter)
        if served is None:
            return False
        return torch.equal(self.base._shard(full.to(device=served.device, dtype=served.dtype)), served)
