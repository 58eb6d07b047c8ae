"""PEFT's LoRA features on the CUDA path (Triton LoRA kernels with their epilogue, CUDA graphs, bf16) in one mixed
batch with a plain LoRA adapter and base rows, against HF transformers + PEFT in fp32 on the same card, with the
tolerances of test_engine_gpu.py (test_families_gpu.check_bf16_against_hf_peft).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from tests.adapters.peft_extras import with_trained_magnitudes  # noqa: E402
from tests.gpu.test_families_gpu import GPU_SHAPE, check_bf16_against_hf_peft  # noqa: E402
from tests.models.families import FAMILIES, PeftSpec, make_peft_adapter, tiny_checkpoint  # noqa: E402


def _specs(family) -> list[PeftSpec]:
    q = family.attention[0]
    targets = [*family.attention, *family.mlp]
    patterns = {"rank_pattern": {q: 12}, "alpha_pattern": {q: 6.0}}
    return [
        PeftSpec("plain", 8, targets),
        PeftSpec("lora-bias", 8, targets, extra={"lora_bias": True, **patterns}),
        PeftSpec("dora", 8, targets, extra={"use_dora": True, **patterns}),
    ]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def feature_model(request, tmp_path_factory):
    family = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(f"gpu-features-{family.name}")
    extra = {**GPU_SHAPE, **({"sliding_window": 24} if family.name == "qwen2" else {})}
    base = tiny_checkpoint(family, root / "base", seed=1, std=0.02, **extra)
    adapters = {}
    for index, spec in enumerate(_specs(family)):
        adapters[spec.name] = make_peft_adapter(base, spec, root / spec.name, seed=index + 1)
        if spec.extra.get("use_dora"):
            with_trained_magnitudes(base, adapters[spec.name], seed=index)
    return base, adapters


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_peft_features_bf16_match_hf_peft(feature_model, cuda_graphs):
    base, adapters = feature_model
    check_bf16_against_hf_peft(base, adapters, max_lora_rank=16, cuda_graphs=cuda_graphs)
