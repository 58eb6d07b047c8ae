"""The shared decoder every family plug-in configures: attention, MLP and block layouts built from a DecoderSpec.

Module names are those of the Llama lineage (model.embed_tokens, model.layers.N.self_attn, model.layers.N.mlp,
model.norm, lm_head); a family named otherwise (GPT-2's transformer.h.N.attn, ...) renames them by prefix in its
DecoderSpec.checkpoint_names. Projections carry the checkpoint names of the modules they pack as output slices, so
weights and adapters find their place without per-family tables (kvrun.runtime.models.weights).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from kvrun.runtime.attention.base import AttentionBackend
from kvrun.runtime.forward_batch import ForwardBatch
from kvrun.runtime.layers.activation import activation
from kvrun.runtime.layers.linear import Projection, Split, local_width, shard
from kvrun.runtime.layers.norm import make_norm
from kvrun.runtime.layers.rotary import RopeSpec, RotaryEmbedding
from kvrun.runtime.layers.vocab import EMBEDDING, HEAD, VocabParallelEmbedding
from kvrun.runtime.models.spec import AttentionSpec, MLPSpec, ModelConfig

if TYPE_CHECKING:
    from kvrun.runtime.distributed.group import TensorParallel


class Attention(nn.Module):
    def __init__(
        self, config: ModelConfig, spec: AttentionSpec, rotary: RotaryEmbedding | None, backend: AttentionBackend,
        fused: bool, tp: TensorParallel | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.head_dim = head_dim = config.head_dim
        # Tensor parallelism splits by whole heads (K/V heads replicated when fewer than the ranks).
        q_heads, kv_heads = Split(config.num_heads, head_dim), Split(config.num_kv_heads, head_dim)
        if len(spec.qkv_slices) == 3:
            slices = dict(zip(spec.qkv_slices, ((q_heads,), (kv_heads,), (kv_heads,))))
        elif spec.qkv_layout == "grouped":  # one module, per K/V head: its queries, its key, its value
            # With fewer K/V heads than ranks, the ranks sharing a group split its queries and copy its key and value.
            group = (Split(config.num_heads // config.num_kv_heads, head_dim), Split(1, head_dim), Split(1, head_dim))
            slices = {spec.qkv_slices[0]: (Split(config.num_kv_heads, sum(part.width for part in group), group),)}
        else:  # one module: q, k and v in that order
            slices = {spec.qkv_slices[0]: (q_heads, kv_heads, kv_heads)}
        transposed = config.decoder.transposed_weights
        self.qkv_proj = Projection(config.hidden_size, slices, spec.qkv_bias, transposed=transposed, tp=tp)
        self.o_proj = Projection(q_heads.width, {spec.o_slice: config.hidden_size}, spec.o_bias, transposed=transposed,
                                 tp=tp, row_split=(q_heads,))  # fmt: skip
        q_size, kv_size = (local_width((split,), tp) for split in (q_heads, kv_heads))
        self.num_heads, self.num_kv_heads = q_size // head_dim, kv_size // head_dim
        self.split = (q_size, kv_size, kv_size)
        self.grouped = spec.qkv_layout == "grouped"
        self.clip_qkv = spec.clip_qkv
        self.q_norm = self.k_norm = None
        if spec.qk_norm is not None:
            per_head = spec.qk_norm_per_head
            self.q_norm = make_norm((self.num_heads, self.head_dim) if per_head else self.head_dim, spec.qk_norm, fused)
            self.k_norm = make_norm((self.num_kv_heads, self.head_dim) if per_head else self.head_dim, spec.qk_norm, fused)
            if per_head:  # one weight row per head: each rank loads its heads' rows
                for norm, heads in ((self.q_norm, config.num_heads), (self.k_norm, config.num_kv_heads)):
                    norm.weight.load_shard = lambda full, heads=heads: shard(full, (Split(heads),), tp)
        self.rotary = rotary
        self.variant = spec.variant
        self.backend = backend

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch, kv_cache: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden, batch.lora)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = self._split_heads(qkv)
        num_tokens = hidden.shape[0]
        if self.q_norm is not None:
            q, k = _head_norm(self.q_norm, q), _head_norm(self.k_norm, k)
        if self.rotary is not None:
            q, k = self.rotary(batch.positions, q, k, batch.token_seq_lens)
        else:  # the backends take strided heads, but a contiguous query keeps every kernel on its fast path
            q = q.contiguous()
        out = self.backend.forward(q, k, v, kv_cache, self.variant)
        return self.o_proj(out.reshape(num_tokens, -1), batch.lora)

    def _split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[tokens, q + 2 kv] → q [tokens, heads, dim], k and v [tokens, kv_heads, dim] (views where possible)."""
        num_tokens = qkv.shape[0]
        if self.grouped:
            groups = qkv.view(num_tokens, self.num_kv_heads, -1, self.head_dim)
            q = groups[:, :, :-2].reshape(num_tokens, self.num_heads, self.head_dim)
            return q, groups[:, :, -2], groups[:, :, -1]
        q, k, v = qkv.split(self.split, dim=-1)
        return (
            q.reshape(num_tokens, self.num_heads, self.head_dim),
            k.reshape(num_tokens, self.num_kv_heads, self.head_dim),
            v.reshape(num_tokens, self.num_kv_heads, self.head_dim),
        )


def _head_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if norm.weight.dim() == 2:  # one weight per head: normalise [tokens, heads, head_dim] as it is
        return norm(x)
    return norm(x.reshape(-1, x.shape[-1])).view_as(x)


class MLP(nn.Module):
    def __init__(
        self, hidden_size: int, spec: MLPSpec, fused: bool, transposed: bool = False, tp: TensorParallel | None = None
    ) -> None:
        super().__init__()
        size = spec.intermediate_size
        if spec.gated and len(spec.in_slices) == 2:
            slices = dict.fromkeys(spec.in_slices, size)
        else:  # one checkpoint module: plain MLP input, or gate and up already fused (Phi-3)
            slices = {spec.in_slices[0]: (Split(size), Split(size)) if spec.gated else size}
        self.gate_up_proj = Projection(hidden_size, slices, spec.bias, transposed=transposed, tp=tp)
        self.down_proj = Projection(size, {spec.out_slice: hidden_size}, spec.bias, transposed=transposed, tp=tp,
                                    row_split=(Split(size),))  # fmt: skip
        self.gated = spec.gated
        if spec.gated and spec.activation in ("silu", "swish") and fused:
            from kvrun.runtime.layers.fused import silu_and_mul

            self._activate = silu_and_mul
        else:
            act = activation(spec.activation)
            self._activate = (lambda x: _gated(act, x)) if spec.gated else act

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.down_proj(self._activate(self.gate_up_proj(hidden, batch.lora)), batch.lora)


def _gated(act, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up


class DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, index: int, rotary: RotaryEmbedding | None, backend: AttentionBackend, fused: bool,
        tp: TensorParallel | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        spec = config.decoder
        hidden = config.hidden_size
        self.block = spec.block
        self.input_layernorm = make_norm(hidden, spec.norm, fused)
        self.self_attn = Attention(config, spec.layers[index], rotary, backend, fused, tp)
        self.mlp = MLP(hidden, spec.mlp, fused, spec.transposed_weights, tp)
        if self.block != "parallel":
            self.post_attention_layernorm = make_norm(hidden, spec.norm, fused)
        if self.block == "sandwich":
            self.pre_feedforward_layernorm = make_norm(hidden, spec.norm, fused)
            self.post_feedforward_layernorm = make_norm(hidden, spec.norm, fused)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch, kv_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) in and out: the stream is hidden + residual, added by the next norm (fused there)."""
        if self.block == "post_norm":  # the stream is each norm's output: nothing left for the next norm to add
            stream = hidden if residual is None else hidden + residual
            normed, _ = self.input_layernorm(self.self_attn(stream, batch, kv_cache), stream)
            return self.post_attention_layernorm(self.mlp(normed, batch), normed)[0], None
        if residual is None:
            residual, normed = hidden, self.input_layernorm(hidden)
        else:
            normed, residual = self.input_layernorm(hidden, residual)
        attended = self.self_attn(normed, batch, kv_cache)
        if self.block == "parallel":
            # HF adds (residual + attention) + mlp; the next norm adds the mlp output to the first sum.
            return self.mlp(normed, batch), residual + attended
        if self.block == "parallel2":
            return self.mlp(self.post_attention_layernorm(residual), batch), residual + attended
        if self.block == "sandwich":
            attended = self.post_attention_layernorm(attended)
            normed, residual = self.pre_feedforward_layernorm(attended, residual)
            return self.post_feedforward_layernorm(self.mlp(normed, batch)), residual
        normed, residual = self.post_attention_layernorm(attended, residual)
        return self.mlp(normed, batch), residual


class DecoderModel(nn.Module):
    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, max_positions: int, fused: bool,
        tp: TensorParallel | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        spec = config.decoder
        hidden = config.hidden_size
        # Under tensor parallelism the vocabulary is split; projections and position tables here stay whole.
        # With tied embeddings the token embedding is the output layer too (CausalLM.lm_head is None).
        roles = (EMBEDDING, HEAD) if config.tie_word_embeddings else (EMBEDDING,)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, spec.embedding_projection or hidden, tp,
                                                   roles=roles)  # fmt: skip
        self.project_in = self.project_out = None
        if spec.embedding_projection is not None:  # LoRA-targetable: PEFT's "all-linear" adapts them
            self.project_in = Projection(spec.embedding_projection, {"project_in": hidden}, False)
            self.project_out = Projection(hidden, {"project_out": spec.embedding_projection}, False)
        self.embed_positions = None
        if spec.learned_positions is not None:
            self.embed_positions = nn.Embedding(spec.learned_positions, hidden)
        self.position_offset = spec.learned_position_offset
        self.embed_norm = None if spec.embedding_norm is None else make_norm(hidden, spec.embedding_norm, fused)
        rotaries: dict[RopeSpec, RotaryEmbedding] = {}  # layers with the same rotary settings share one table
        layers = []
        for index, layer in enumerate(spec.layers):
            rotary = None
            if layer.rope is not None:
                rotary = rotaries.setdefault(layer.rope, RotaryEmbedding(layer.rope, max_positions, fused))
            layers.append(DecoderLayer(config, index, rotary, backend, fused, tp))
        self.layers = nn.ModuleList(layers)
        self.norm = make_norm(hidden, spec.norm, fused) if spec.final_norm else None
        self.embedding_scale = spec.embedding_scale

    def embed(self, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.embed_tokens(batch.input_ids, batch.lora)
        if self.embedding_scale is not None:
            hidden = hidden * torch.tensor(self.embedding_scale, dtype=hidden.dtype)
        if self.project_in is not None:
            hidden = self.project_in(hidden, batch.lora)
        if self.embed_positions is not None:
            hidden = hidden + self.embed_positions(batch.positions + self.position_offset)
        if self.embed_norm is not None:
            hidden = self.embed_norm(hidden)
        return hidden

    def final_hidden(self, hidden: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch) -> torch.Tensor:
        """The last layer's stream → final norm → project_out, for the rows that sample."""
        last = batch.logits_indices
        if self.project_out is not None:
            # project_out may carry LoRA, whose segments index every token of the step: run it on all of them.
            stream = hidden if residual is None else hidden + residual
            return self.project_out(stream if self.norm is None else self.norm(stream), batch.lora)[last]
        if residual is None:
            return hidden[last] if self.norm is None else self.norm(hidden[last])
        return self.norm(hidden[last], residual[last])[0]


class CausalLM(nn.Module):
    """Any decoder-only family: embeddings → layers → final norm → (scaled, capped) logits."""

    def __init__(
        self, config: ModelConfig, backend: AttentionBackend, max_positions: int, fused: bool = False,
        tp: TensorParallel | None = None,
    ) -> None:  # fmt: skip
        """fused=True (CUDA): norms, rotary and the SwiGLU activation run as single Triton kernels.
        tp: this process's rank of a tensor-parallel group (None: the whole model on one device)."""
        super().__init__()
        self.config = config
        spec = config.decoder
        self.model = DecoderModel(config, backend, max_positions, fused, tp)
        self.lm_head = None
        if not config.tie_word_embeddings:
            width = spec.embedding_projection or config.hidden_size
            self.lm_head = VocabParallelEmbedding(config.vocab_size, width, tp, bias=spec.lm_head_bias, roles=(HEAD,))
        elif spec.lm_head_bias:
            raise ValueError(f"{config.architecture}: an lm_head bias with tied embeddings is not supported")
        self._checkpoint_names = dict(spec.checkpoint_names)

    def checkpoint_name(self, path: str) -> str:
        """The checkpoint's name for a module or parameter path of this model (see DecoderSpec.checkpoint_names)."""
        return checkpoint_path(path, self._checkpoint_names)

    @property
    def needs_token_seq_lens(self) -> bool:
        return any(layer.rope is not None and layer.rope.length_dependent for layer in self.config.decoder.layers)

    def length_regime(self, length: int) -> bytes:
        """What a prompt of `length` tokens' K/V depend on besides tokens, positions and adapter (empty: nothing):
        a length-dependent rotary embedding rotates a whole prompt by its length (part of prefix-cache keys)."""
        ropes = dict.fromkeys(layer.rope for layer in self.config.decoder.layers if layer.rope is not None)
        regimes = [rope.length_regime(length) for rope in ropes if rope.length_dependent]
        return b"" if not any(regimes) else b"rope-length=" + b",".join(b"%d" % regime for regime in regimes)

    def forward(self, batch: ForwardBatch, kv_cache: torch.Tensor) -> torch.Tensor:
        """Logits of each request's last token: [batch, vocab]. kv_cache: [layers, pages, 2, page_size, kv_heads, dim]."""
        return self.logits_of(*self.layer_stream(batch, kv_cache), batch)

    def layer_stream(self, batch: ForwardBatch, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, residual) after the last layer, every token of the step (the part steps captured in pieces run)."""
        model = self.model
        hidden, residual = model.embed(batch), None
        for index, layer in enumerate(model.layers):
            hidden, residual = layer(hidden, residual, batch, kv_cache[index])
        return hidden, residual

    def logits_of(self, hidden: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch) -> torch.Tensor:
        """The last layer's stream → the logits of the rows that sample (batch.logits_indices)."""
        return self.compute_logits(self.model.final_hidden(hidden, residual, batch), batch)

    def compute_logits(self, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """hidden: [rows, width] of the rows that sample (batch.logits_indices)."""
        spec = self.config.decoder
        logits = (self.model.embed_tokens if self.lm_head is None else self.lm_head).logits(hidden, batch)
        if spec.logit_scale is not None:
            logits = logits * spec.logit_scale
        if spec.final_logit_soft_cap is not None:
            logits = torch.tanh(logits / spec.final_logit_soft_cap) * spec.final_logit_soft_cap
        return logits

    @torch.no_grad()
    def finish_loading(self) -> None:
        """Turn checkpoint weights into the form the forward pass uses (once, after loading)."""
        if self.config.decoder.normalized_lm_head:
            head = self.model.embed_tokens if self.lm_head is None else self.lm_head
            head.weight.copy_(F.normalize(head.weight, dim=-1))


def checkpoint_path(path: str, names: dict[str, str]) -> str:
    """Rename path by the longest prefix (whole dotted parts, layer indices written "{i}") found in names."""
    if not names:
        return path
    parts = path.split(".")
    generic = ["{i}" if part.isdigit() else part for part in parts]
    for cut in range(len(parts), 0, -1):
        target = names.get(".".join(generic[:cut]))
        if target is not None:
            index = next((part for part in parts[:cut] if part.isdigit()), "")
            return ".".join([target.replace("{i}", index), *parts[cut:]]) if target else ".".join(parts[cut:])
    return path
