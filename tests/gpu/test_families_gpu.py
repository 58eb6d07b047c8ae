"""Every family on the CUDA path in bf16 (FlashInfer with its sliding-window / soft-cap / scale variants, Triton LoRA
and fused kernels, CUDA graphs) against HF transformers + PEFT in fp32 on the same card, so the bound measures
kvrun's own bf16 error, with the tolerances of test_engine_gpu.py: teacher-forced, kvrun's logprob for its own token
within 0.1 nats of the reference at every step, its token the reference's argmax on >= 95% of steps and the argmax
or a near-tie (<= 0.05 nats) on >= 99%.

Shapes use head_dim 128 for every family, as the production models do, so FlashInfer compiles one head size.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from tests.gpu.test_engine_gpu import (  # noqa: E402
    EXACT_AGREEMENT, LOGPROB_ATOL, NEAR_TIE_NATS, TIE_AWARE_AGREEMENT, teacher_forced,
)  # fmt: skip
from tests.models.families import FAMILIES, make_peft_adapter, standard_adapters, tiny_checkpoint  # noqa: E402

GPU_SHAPE = dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, head_dim=128)  # fmt: skip
FAMILY_SHAPES = {  # what the tiny CPU overrides set that must follow the larger head
    "phi3": dict(original_max_position_embeddings=48, partial_rotary_factor=0.5,
                 rope_scaling={"type": "longrope", "short_factor": [1.0 + i / 64 for i in range(32)],
                               "long_factor": [2.0 + i / 16 for i in range(32)]}),
    "gemma2": dict(sliding_window=24, query_pre_attn_scalar=96),
    "gemma3": dict(sliding_window=24, query_pre_attn_scalar=96),
    "mistral": dict(sliding_window=24),
    "qwen2": dict(sliding_window=24),
    "starcoder2": dict(sliding_window=24),
    "gpt2": dict(n_inner=1024),  # learned positions, Conv1D weights, no rotary
    "gpt_neox": dict(rotary_pct=0.5),  # partial rotary in the fused kernel, per-head fused qkv
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def gpu_family(request, tmp_path_factory):
    family = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(f"gpu-{family.name}")
    extra = {**GPU_SHAPE, **FAMILY_SHAPES.get(family.name, {})}
    if family.name == "phi3":
        extra.pop("head_dim")
    base = tiny_checkpoint(family, root / "base", seed=1, std=0.02, **extra)
    adapters = {s.name: make_peft_adapter(base, s, root / s.name, seed=i) for i, s in enumerate(standard_adapters(family))}
    return base, adapters


def test_family_bf16_cuda_path_matches_hf_peft(gpu_family):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kvrun import LLM, SamplingParams

    base, adapters = gpu_family
    llm = LLM(str(base), dtype="bfloat16", max_loras=3, max_lora_rank=16, max_num_seqs=16, cuda_graphs=True,
              gpu_memory_utilization=0.1)  # several test processes share the card
    for name, directory in adapters.items():
        llm.load_adapter(name, directory)
    generator = torch.Generator().manual_seed(0)
    names = [*adapters, None, *adapters, None]
    batch = [(torch.randint(3, 1000, (9 + 13 * i,), generator=generator).tolist(), a) for i, a in enumerate(names)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
    outputs = llm.generate([p for p, _ in batch], params, adapters=[a for _, a in batch])
    del llm
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager").cuda()
    peft = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in list(adapters)[1:]:
        peft.load_adapter(adapters[name], adapter_name=name)
    peft.eval()
    exact = near = total = 0
    for output, (prompt, adapter) in zip(outputs, batch):
        reference = teacher_forced(peft, prompt, adapter, output.token_ids)
        for step, token in enumerate(output.token_ids):
            exact += int(reference[step].argmax()) == token
            near += float(reference[step].max() - reference[step, token]) <= NEAR_TIE_NATS
            total += 1
            assert abs(output.logprobs[step][token] - float(reference[step, token])) <= LOGPROB_ATOL, (adapter, step)
    assert exact / total >= EXACT_AGREEMENT, f"greedy agreement {exact}/{total}"
    assert near / total >= TIE_AWARE_AGREEMENT, f"agreement counting near-ties {near}/{total}"
