"""Adapters made by PEFT, brought to what training leaves in them where a random init would not."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapters_registry.peft_config import check_config


def with_trained_magnitudes(base_dir: Path, adapter_dir: Path, seed: int) -> None:
    """PEFT starts each DoRA magnitude at ||W + s·BA|| per output feature, and training moves it; make_peft_adapter
    draws A and B after that and overwrites the magnitudes with N(0, 0.05) (which would shrink every adapted output
    towards its bias). Set each to its norm under the final A and B times (1 + 0.3·noise), as a trained DoRA adapter
    holds. Needs the base checkpoint in one model.safetensors with HF's module names."""
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    base = load_file(base_dir / "model.safetensors")
    settings = check_config(json.loads((adapter_dir / "adapter_config.json").read_text()), max_rank=1024)
    generator = torch.Generator().manual_seed(seed)
    for key in [key for key in tensors if key.endswith(".lora_magnitude_vector")]:
        module = key.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector")
        a, b = (tensors[f"base_model.model.{module}.lora_{side}.weight"] for side in "AB")
        weight = base[f"{module}.weight"].float()
        norm = torch.linalg.vector_norm(weight + settings.scaling_of(module) * (b @ a), dim=1)
        tensors[key] = (norm * (1 + 0.3 * torch.randn(norm.shape, generator=generator))).to(tensors[key].dtype)
    save_file(tensors, adapter_dir / "adapter_model.safetensors", metadata={"format": "pt"})
