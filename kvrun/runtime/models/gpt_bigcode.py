"""GPT-BigCode (SantaCoder, StarCoder 1, WizardCoder): GPT-2's layout with Linear projections and multi-query
attention (one key/value head behind a fused `c_attn`; per-head fused q/k/v when `multi_query` is off)."""

from __future__ import annotations

from kvrun.runtime.models.gpt2 import read_gpt2_layout
from kvrun.runtime.models.hf_config import HFConfig
from kvrun.runtime.models.spec import ModelConfig

ARCHITECTURES = {"GPTBigCodeForCausalLM": "gpt_bigcode"}
EXAMPLE = "bigcode/starcoderbase-1b, bigcode/gpt_bigcode-santacoder"


def read_config(config: HFConfig, name: str) -> ModelConfig:
    multi_query = bool(config.get("multi_query", True))
    return read_gpt2_layout(config, name, conv1d=False, default_activation="gelu_pytorch_tanh", multi_query=multi_query)
