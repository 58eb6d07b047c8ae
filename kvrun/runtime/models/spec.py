"""What a model is, once read from its checkpoint's config: the generic shape the engine sizes things by
(ModelConfig) and the recipe the shared decoder builds its layers from (DecoderSpec).

Each architecture's plug-in (kvrun.runtime.models.<family>) turns an HF config.json into these; nothing else in
kvrun reads config keys. Every field here changes the computation or the memory plan: a family that reads a config
value it cannot express here refuses the checkpoint instead of ignoring it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrun.runtime.attention.base import AttentionVariant
from kvrun.runtime.layers.norm import NormSpec
from kvrun.runtime.layers.rotary import RopeSpec


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """One layer's attention: projections, optional q/k norms, rotary embedding and the backend variant."""

    variant: AttentionVariant
    rope: RopeSpec | None
    qkv_slices: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # checkpoint names; one name = already fused
    # How one fused qkv module orders its output: "split" q | k | v (GPT-2, MPT, BigCode); "grouped" per KV head,
    # its queries then its key then its value ([kv_heads, q_per_kv + 2, head_dim]: NeoX, Bloom, Falcon)
    qkv_layout: str = "split"
    o_slice: str = "o_proj"
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: NormSpec | None = None
    qk_norm_per_head: bool = False  # one weight per head ([heads, head_dim], Cohere) instead of one shared [head_dim]
    clip_qkv: float | None = None  # clamp the fused q/k/v output to [-clip, clip] (MPT)

    def __post_init__(self) -> None:
        if self.qkv_layout not in ("split", "grouped"):
            raise ValueError(f"unknown qkv layout {self.qkv_layout!r}")


@dataclass(frozen=True, slots=True)
class MLPSpec:
    intermediate_size: int
    activation: str  # an HF `hidden_act` name (kvrun.runtime.layers.activation)
    gated: bool = True  # act(gate) * up, then down; False: act(up), then down
    in_slices: tuple[str, ...] = ("gate_proj", "up_proj")  # checkpoint names of the input projection's parts
    out_slice: str = "down_proj"
    bias: bool = False


@dataclass(frozen=True, slots=True)
class DecoderSpec:
    """How every layer and the ends of the model compute.

    block:
      "sequential"  x += attn(norm1(x)); x += mlp(norm2(x))                                  (Llama)
      "sandwich"    x += norm2(attn(norm1(x))); x += norm4(mlp(norm3(x)))                     (Gemma 2/3)
      "parallel"    n = norm1(x); x += attn(n) + mlp(n)                                      (Cohere, Phi, Falcon)
      "parallel2"   x += attn(norm1(x)) + mlp(norm2(x))                                      (NeoX, Falcon 40B+)
      "post_norm"   x = norm1(x + attn(x)); x = norm2(x + mlp(x))                             (OPT-350m)

    The ends: token embeddings (× embedding_scale) → project_in → + learned position embeddings → embedding_norm
    → layers → final norm → project_out → lm_head (+ bias) → logit scale, soft cap.
    """

    norm: NormSpec
    layers: tuple[AttentionSpec, ...]  # one per layer
    mlp: MLPSpec
    block: str = "sequential"
    embedding_scale: float | None = None  # multiply token embeddings (rounded to the model dtype, as Gemma does)
    logit_scale: float | None = None  # multiply final logits (Cohere)
    final_logit_soft_cap: float | None = None  # cap * tanh(logits / cap) (Gemma 2)
    normalized_lm_head: bool = False  # lm_head rows are L2-normalised before use (Baichuan 2's NormHead)
    learned_positions: int | None = None  # rows of a learned absolute position table (GPT-2, OPT, BigCode)
    learned_position_offset: int = 0  # table row of position 0 (OPT: 2)
    embedding_norm: NormSpec | None = None  # a norm right after the embeddings (Bloom)
    embedding_projection: int | None = None  # embeddings (and lm_head) of this width, projected to/from hidden (OPT)
    lm_head_bias: bool = False  # Phi
    final_norm: bool = True  # False: the last layer's stream goes to the head as it is (OPT-350m)
    transposed_weights: bool = False  # checkpoint projections store [in, out] (GPT-2's Conv1D)
    # kvrun module path → checkpoint module path, for families not named like Llama: (prefix, replacement) pairs,
    # "{i}" standing for a layer index; the longest matching prefix wins (kvrun.runtime.models.weights)
    checkpoint_names: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.checkpoint_names, dict):
            object.__setattr__(self, "checkpoint_names", tuple(self.checkpoint_names.items()))
        if self.block not in ("sequential", "sandwich", "parallel", "parallel2", "post_norm"):
            raise ValueError(f"unknown decoder block {self.block!r}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The model as the engine sees it: sizes for the KV cache, vocabulary, limits, and the decoder recipe."""

    architecture: str
    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    decoder: DecoderSpec

    @property
    def attention_variants(self) -> tuple[AttentionVariant, ...]:
        return tuple(dict.fromkeys(layer.variant for layer in self.decoder.layers))
