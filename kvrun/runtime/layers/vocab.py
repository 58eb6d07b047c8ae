"""The vocabulary matrix split by rows over tensor-parallel ranks: token embeddings in, logits out.

Rank r holds rows [r·per_rank, (r+1)·per_rank) with per_rank = ceil(vocab / size); the last rank's rows past the
vocabulary are zero padding. Embedding: each rank looks up the ids it holds (zeros elsewhere), one all-reduce sums
them. Logits: each rank multiplies by its rows, one all-gather concatenates them, the padding is cut off.

The matrix plays one or both of two roles, which LoRA wrapping finds by type and role (kvrun.runtime.models.weights
.vocab_layers): "embedding" (token ids → hidden) and "head" (hidden → logits; the tied embedding plays both). For
the head role, `OutputHead` presents it with a Projection's interface, so a LoRA on the output layer is a linear LoRA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from kvrun.runtime.distributed.group import TensorParallel
    from kvrun.runtime.forward_batch import ForwardBatch, LoRABatchInfo

EMBEDDING, HEAD = "embedding", "head"


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self, vocab_size: int, hidden_size: int, tp: TensorParallel | None = None, bias: bool = False,
        roles: tuple[str, ...] = (EMBEDDING,),
    ) -> None:  # fmt: skip
        """bias: as an lm_head, one bias per vocabulary entry (Phi). roles: EMBEDDING and/or HEAD."""
        super().__init__()
        self.vocab_size = vocab_size
        self.roles = roles
        self.tp = tp if tp is not None and tp.size > 1 else None
        size, rank = (self.tp.size, self.tp.rank) if self.tp is not None else (1, 0)
        self.num_local = -(-vocab_size // size)
        self.start = rank * self.num_local
        self.weight = nn.Parameter(torch.empty(self.num_local, hidden_size))
        self.weight.load_shard = self._shard  # read by kvrun.runtime.models.weights.load_weights
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.num_local))
            self.bias.load_shard = self._shard

    def _shard(self, full: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return full
        rows = full[self.start : self.start + self.num_local]
        if rows.shape[0] < self.num_local:
            rows = torch.cat([rows, rows.new_zeros(self.num_local - rows.shape[0], *rows.shape[1:])])
        return rows

    def forward(self, input_ids: torch.Tensor, lora: LoRABatchInfo | None = None) -> torch.Tensor:
        if self.tp is None:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.num_local)
        hidden = F.embedding(local.masked_fill(outside, 0), self.weight)
        hidden = hidden.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(hidden)

    def logits(self, hidden: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        """[rows, vocab]: hidden times the whole vocabulary matrix (gathered from every rank). batch: the step, for
        a LoRA wrapper's per-row deltas."""
        return self.gather(F.linear(hidden, self.weight, self.bias))

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """This rank's logits [rows, num_local] → the whole vocabulary's [rows, vocab]."""
        if self.tp is None:
            return logits
        return self.tp.all_gather(logits)[:, : self.vocab_size]


class OutputHead:
    """The head role of a vocabulary matrix as a column-parallel Projection of one output slice (its checkpoint
    name): what a LinearWithLoRA needs of its base (kvrun.runtime.layers.linear.Projection). Under tensor
    parallelism each rank holds its vocabulary rows (and of a LoRA's B), and `reduce` gathers the logits."""

    reduces = False

    def __init__(self, vocab: VocabParallelEmbedding, name: str) -> None:
        self.vocab = vocab
        self.tp = vocab.tp
        self.in_features = vocab.weight.shape[1]
        self.output_slices = {name: vocab.num_local}

    @property
    def weight(self) -> torch.Tensor:
        return self.vocab.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.vocab.bias

    def shard_input(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def shard_output(self, slice_name: str, tensor: torch.Tensor) -> torch.Tensor:
        return self.vocab._shard(tensor)

    def partial(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.vocab.weight, self.vocab.bias)

    def reduce(self, logits: torch.Tensor) -> torch.Tensor:
        return self.vocab.gather(logits)
