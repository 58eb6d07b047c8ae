"""The Llama-family decoder (Llama 2/3, SmolLM2), config-driven; projections fused as qkv and gate_up."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from kvrun.config import ModelConfig
from kvrun.runtime.attention.base import AttentionBackend
from kvrun.runtime.forward_batch import ForwardBatch
from kvrun.runtime.layers.linear import Projection
from kvrun.runtime.layers.norm import RMSNorm
from kvrun.runtime.layers.rotary import RotaryEmbedding

# HF parameter suffix → (our fused module, the slice it fills)
_FUSED_PARTS = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q_proj"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k_proj"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v_proj"),
    "mlp.gate_proj": ("mlp.gate_up_proj", "gate_proj"),
    "mlp.up_proj": ("mlp.gate_up_proj", "up_proj"),
}


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, attention: AttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Projection(
            config.hidden_size, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}, config.attention_bias
        )
        self.o_proj = Projection(q_size, {"o_proj": config.hidden_size}, config.attention_bias)
        self.split = (q_size, kv_size, kv_size)
        self.rotary = rotary
        self.attention = attention

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch, kv_cache: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden, batch.lora).split(self.split, dim=-1)
        num_tokens = hidden.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(batch.positions, q, k)
        out = self.attention.forward(q, k, v, kv_cache)
        return self.o_proj(out.reshape(num_tokens, -1), batch.lora)


def _silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, fused: bool) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = Projection(config.hidden_size, {"gate_proj": size, "up_proj": size}, config.mlp_bias)
        self.down_proj = Projection(size, {"down_proj": config.hidden_size}, config.mlp_bias)
        if fused:
            from kvrun.runtime.layers.fused import silu_and_mul

            self._activation = silu_and_mul
        else:
            self._activation = _silu_and_mul

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        return self.down_proj(self._activation(self.gate_up_proj(hidden, batch.lora)), batch.lora)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, rotary: RotaryEmbedding, attention: AttentionBackend, fused: bool
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused)
        self.self_attn = LlamaAttention(config, rotary, attention)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused)
        self.mlp = LlamaMLP(config, fused)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch, kv_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it); the next norm adds the two."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, batch, kv_cache)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden, batch), residual


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, config: ModelConfig, attention: AttentionBackend, max_positions: int, fused: bool = False
    ) -> None:
        """fused=True (CUDA): norms, rotary and the SwiGLU activation run as single Triton kernels."""
        super().__init__()
        self.config = config
        rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling, fused)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, rotary, attention, fused) for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, False)

    def forward(self, batch: ForwardBatch, kv_cache: torch.Tensor) -> torch.Tensor:
        """Logits of each request's last token: [batch, vocab]. kv_cache: [layers, pages, 2, page_size, kv_heads, dim]."""
        hidden, residual = self.embed_tokens(batch.input_ids), None
        for index, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, batch, kv_cache[index])
        last = batch.logits_indices
        hidden, _ = self.norm(hidden[last], residual[last])
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            target, part = self._locate(name)
            if target not in params:
                raise ValueError(f"unexpected weight {name!r} for {self.config.architecture}")
            param = params[target]
            if part is None:
                if param.shape != tensor.shape:
                    raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
                param.data.copy_(tensor)
            else:
                rows = self._slice_rows(target, part)
                param.data[rows].copy_(tensor)
            loaded.add(name)
        missing = [name for name in self._expected_names() if name not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:3]}")

    def _locate(self, name: str) -> tuple[str, str | None]:
        name = name.removeprefix("model.")
        for hf_part, (fused, part) in _FUSED_PARTS.items():
            marker = f".{hf_part}."
            if marker in name:
                return name.replace(marker, f".{fused}."), part
        return name, None

    def _slice_rows(self, target: str, part: str) -> slice:
        module = self.get_submodule(target.rsplit(".", 1)[0])
        start = 0
        for slice_name, width in module.output_slices.items():
            if slice_name == part:
                return slice(start, start + width)
            start += width
        raise KeyError(part)

    def _expected_names(self) -> list[str]:
        names = []
        for name, _ in self.named_parameters():
            parts = [hf_part for hf_part, (fused, _part) in _FUSED_PARTS.items() if f".{fused}." in name]
            for hf_part in parts:
                names.append("model." + name.replace(f".{_FUSED_PARTS[hf_part][0]}.", f".{hf_part}."))
            if not parts:
                names.append(name if name.startswith("lm_head") else f"model.{name}")
        return names
