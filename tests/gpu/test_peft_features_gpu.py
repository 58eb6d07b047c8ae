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
    return feature_checkpoint(request.param, tmp_path_factory.mktemp(f"gpu-features-{request.param}"))


def feature_checkpoint(family_name: str, root):
    """A GPU-shaped tiny checkpoint with a plain, a lora_bias and a DoRA adapter on every module."""
    family = FAMILIES[family_name]
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


INVOKE = [1001, 1002, 1003]  # the prompts' other tokens are drawn from [3, 1000)


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_activated_lora_bf16_matches_hf_peft(feature_model, request, tmp_path, cuda_graphs):
    """An activated LoRA (with lora_bias) beside plain LoRA and base rows: each prompt row splits into a base
    segment and an adapter segment of the Triton kernels at its last invocation (in a 16-token chunk or a later one;
    absent: base everywhere); decode rows, graphed or not, are all activated."""
    base, adapters = feature_model
    family = FAMILIES[request.node.callspec.params["feature_model"]]
    spec = PeftSpec("alora", 8, [*family.attention, *family.mlp],
                    extra={"alora_invocation_tokens": INVOKE, "task_type": "CAUSAL_LM", "lora_bias": True})  # fmt: skip
    served = {"plain": adapters["plain"], "alora": make_peft_adapter(base, spec, tmp_path / "alora", seed=9)}
    generator = torch.Generator().manual_seed(0)

    def tokens(count: int) -> list[int]:
        return torch.randint(3, 1000, (count,), generator=generator).tolist()

    prompts = [tokens(5) + INVOKE + tokens(30), tokens(20) + INVOKE + tokens(4) + INVOKE + tokens(9),
               tokens(40) + INVOKE, INVOKE + tokens(12), tokens(25)]  # fmt: skip
    batch = [(p, "alora") for p in prompts] + [(tokens(17), "plain"), (prompts[0], "plain"), (prompts[0], None)]
    check_bf16_against_hf_peft(base, served, batch=batch, max_lora_rank=16, cuda_graphs=cuda_graphs,
                               max_num_batched_tokens=16)  # fmt: skip


@pytest.fixture(scope="module", params=["untied", "tied"])
def vocab_model(request, tmp_path_factory):
    """LoRA on the token embedding (the embedding lookup in A^T, then the Triton expand) and on the output layer (the
    Triton shrink/expand over the rows that sample, segments found on the device inside the CUDA graph)."""
    family = FAMILIES["llama"]
    root = tmp_path_factory.mktemp(f"gpu-vocab-{request.param}")
    base = tiny_checkpoint(family, root / "base", seed=1, std=0.02, tie_word_embeddings=request.param == "tied",
                           **GPU_SHAPE)  # fmt: skip
    targets = [*family.attention, *family.mlp]
    specs = [
        PeftSpec("plain", 8, targets),
        PeftSpec("vocab", 8, [*targets, "embed_tokens", "lm_head"], extra={"rank_pattern": {"lm_head": 12}}),
        PeftSpec("head-only", 16, ["lm_head"]),
    ]
    adapters = {spec.name: make_peft_adapter(base, spec, root / spec.name, seed=i + 1) for i, spec in enumerate(specs)}
    return base, adapters


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_embedding_and_output_layer_lora_bf16_match_hf_peft(vocab_model, cuda_graphs):
    base, adapters = vocab_model
    check_bf16_against_hf_peft(base, adapters, max_lora_rank=16, cuda_graphs=cuda_graphs)


@pytest.mark.parametrize("cuda_graphs", [True, False])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_trainable_tokens_and_layer_copies_bf16_match_hf_peft(tied, cuda_graphs, tmp_path):
    """Trainable tokens (fixed-shape gathers inside the CUDA graph; tied: the output layer's rows too) and whole copies
    of the embedding and output layer (their steps run eagerly) beside plain LoRA and base rows."""
    family = FAMILIES["llama"]
    base = tiny_checkpoint(family, tmp_path / "base", seed=1, std=0.02, tie_word_embeddings=tied, **GPU_SHAPE)
    targets = [*family.attention, *family.mlp]
    specs = [
        PeftSpec("plain", 8, targets),
        PeftSpec("tokens", 8, targets, extra={"trainable_token_indices": list(range(3, 1000, 17))}),
        PeftSpec("copies", 8, family.attention, extra={"modules_to_save": ["embed_tokens", "lm_head"]}),
    ]
    adapters = {spec.name: make_peft_adapter(base, spec, tmp_path / spec.name, seed=i) for i, spec in enumerate(specs, 1)}
    check_bf16_against_hf_peft(base, adapters, max_lora_rank=16, cuda_graphs=cuda_graphs, solo=True,
                               max_full_module_slots=1)  # fmt: skip
