"""The attention seam: planned once per step, run once per layer.

Shaped like FlashInfer's wrappers (`plan(...)` with the batch's paged-KV layout, then `run(q, kv_cache)` per layer)
so the GPU backend drops in behind the same calls as the CPU reference.

KV cache layout, per layer (FlashInfer "NHD" paged layout):
    kv_cache: [num_pages, 2, page_size, num_kv_heads, head_dim]   # [:, 0] keys, [:, 1] values
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """One step's paged-KV layout.

    Requests are laid out one after another: request i owns query rows qo_indptr[i]:qo_indptr[i+1] and the pages
    kv_page_indices[kv_indptr[i]:kv_indptr[i+1]]. Sequence lengths count the tokens written this step. The index
    arrays stay on the host (FlashInfer plans from host arrays without waiting on the GPU); slot_mapping lives on
    the model's device because the K/V scatter reads it inside the forward pass.
    """

    is_prefill: bool
    qo_indptr: torch.Tensor  # [batch + 1] int32, host, query-token offsets
    kv_indptr: torch.Tensor  # [batch + 1] int32, host, offsets into kv_page_indices
    kv_page_indices: torch.Tensor  # [total_pages] int32, host, page ids of each request in order
    kv_last_page_len: torch.Tensor  # [batch] int32, host, tokens used in each request's last page (1..page_size)
    seq_lens: torch.Tensor  # [batch] int32, host, KV length of each request after this step
    slot_mapping: torch.Tensor  # [num_tokens] int64, device, page * page_size + offset of each new token's K/V
    page_size: int
    query_lens_host: list[int]
    seq_lens_host: list[int]


@dataclass(frozen=True, slots=True)
class AttentionVariant:
    """What differs between the attention of two layers (or two models) beyond the head counts.

    scale:           multiplies q·k (1/sqrt(head_dim) unless the model says otherwise)
    sliding_window:  a query at position p sees keys at p - sliding_window + 1 .. p; None = all
    logits_soft_cap: scores become cap * tanh(scores / cap) before masking and softmax; None = off
    alibi:           scores (after scaling) gain slope_h * (key position - query position) (Bloom, MPT; the model
                     has no rotary embedding then); head h's slope is the backend's alibi_slopes[h]: the whole
                     model's alibi_slopes(num_heads) for the heads this rank holds (see select_backend)
    """

    scale: float
    sliding_window: int | None = None
    logits_soft_cap: float | None = None
    alibi: bool = False

    def __post_init__(self) -> None:
        if self.alibi and self.logits_soft_cap is not None:
            raise ValueError("ALiBi with a logit soft cap is not supported")


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """[num_heads] fp32: the ALiBi slopes of Press et al. as Bloom and FlashInfer compute them: 2^(-8 i / n) for
    the n = largest power of two <= num_heads heads, then every other slope of the 2n series for the rest."""
    n = 2 ** math.floor(math.log2(num_heads))
    slopes = [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]
    slopes += [2.0 ** (-4.0 * i / n) for i in range(1, 2 * (num_heads - n), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


class AttentionBackend(Protocol):
    """One backend per model, knowing every variant its layers use (planned together once per step)."""

    graph_buffer_bytes: int  # device memory prepare_graph allocates per captured batch size (the memory plan counts it)
    graph_page_index_bytes: int  # ... and per row and KV page of max_model_len (page index buffers)

    def plan(self, metadata: AttentionMetadata, graph_batch_size: int | None = None) -> None:
        """Prepare for one step; called once before the first layer. graph_batch_size: plan into the buffers of the
        CUDA graph captured for that many rows (see prepare_graph)."""

    # Set while a step is captured in pieces (kvrun.runtime.step_graphs, CUDA only): forward then writes the K/V,
    # hands q to it and returns the buffer `attend` will fill between the pieces.
    capture: object | None

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, variant: AttentionVariant, out: torch.Tensor) -> None:
        """The planned attention of q over the cache into out, K/V already written (replaying captured pieces)."""

    def prepare_graph(self, batch_size: int, max_pages: int) -> None:
        """Allocate the fixed-address buffers a decode graph of batch_size rows plans into (no-op where graphs
        are not supported)."""

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_q_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [num_pages, 2, page_size, num_kv_heads, head_dim]
        variant: AttentionVariant,
    ) -> torch.Tensor:  # [num_tokens, num_q_heads, head_dim]
        """Write this step's K/V into the cache at slot_mapping, then attend causally over each request's pages."""


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter new keys/values into their pages (the layout every backend shares)."""
    page_size = kv_cache.shape[2]
    pages = torch.div(slot_mapping, page_size, rounding_mode="floor")
    offsets = slot_mapping - pages * page_size
    kv_cache[pages, 0, offsets] = k.to(kv_cache.dtype)
    kv_cache[pages, 1, offsets] = v.to(kv_cache.dtype)
