"""Every family on the CUDA path in bf16 (FlashInfer with its sliding-window / soft-cap / scale variants, Triton LoRA
and fused kernels, CUDA graphs) against HF transformers + PEFT in fp32 on the same card, teacher-forced on kvrun's
own tokens. kvrun's token must be the fp32 reference's argmax on >= 95% of steps and the argmax or a near-tie
(<= 0.05 nats) on >= 99%. Its logprob error is bounded by what bf16 itself costs this family: HF + PEFT run in bf16
on the same rows gives the family's own bf16 error (Gemma's sqrt(hidden) embedding scale and soft-caps make it larger
than Llama's), and kvrun's error must stay within max(0.1 nats, 2x HF's) at every step and within 1.5x HF's mean
(plus 0.01 nats) on average.

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
    # Every prompt is longer than original_max_position_embeddings, so LongRoPE's long factors rotate every key both
    # here and in the teacher-forced reference (a sequence that crosses it mid-generation keeps its early keys rotated
    # with the short factors, as HF's own generate does, which one teacher-forced pass cannot reproduce).
    "phi3": dict(original_max_position_embeddings=8, partial_rotary_factor=0.5,
                 rope_scaling={"type": "longrope", "short_factor": [1.0 + i / 64 for i in range(32)],
                               "long_factor": [2.0 + i / 16 for i in range(32)]}),
    "gemma2": dict(sliding_window=24, query_pre_attn_scalar=96),
    "gemma3": dict(sliding_window=24, query_pre_attn_scalar=96),
    "mistral": dict(sliding_window=24),
    "qwen2": dict(sliding_window=24),
    "starcoder2": dict(sliding_window=24),
    "gpt2": dict(n_inner=1024),  # learned positions, Conv1D weights, no rotary
    "gpt_neox": dict(rotary_pct=0.5),  # partial rotary in the fused kernel, per-head fused qkv
    "opt": dict(ffn_dim=1024, word_embed_proj_dim=256),  # project_in/out with LoRA, learned positions offset 2
    "phi": dict(partial_rotary_factor=0.375),  # 48 of 128 features rotate; parallel block, lm_head bias
    "gpt_bigcode": dict(n_inner=1024),  # multi-query: one KV head for four query heads
    "falcon": dict(ffn_hidden_size=1024),  # grouped fused qkv with two KV heads, two parallel norms
    # bloom and mpt: ALiBi in FlashInfer (prefill, decode and its CUDA graphs); on two GPUs in
    # tests/gpu/test_tensor_parallel_gpu.py
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def gpu_family(request, tmp_path_factory):
    return family_checkpoint(request.param, tmp_path_factory.mktemp(f"gpu-{request.param}"))


def test_family_bf16_cuda_path_matches_hf_peft(gpu_family):
    base, adapters = gpu_family
    check_bf16_against_hf_peft(base, adapters, max_lora_rank=16, cuda_graphs=True)


def family_checkpoint(name: str, root, **overrides):
    """A family's GPU-shaped tiny checkpoint and its standard adapters."""
    family = FAMILIES[name]
    extra = {**GPU_SHAPE, **FAMILY_SHAPES.get(family.name, {}), **overrides}
    if family.name in ("phi3", "falcon"):  # their configs derive head_dim (hidden / heads = 128 here)
        extra.pop("head_dim")
    base = tiny_checkpoint(family, root / "base", seed=1, std=0.02, **extra)
    specs = standard_adapters(family)
    return base, {spec.name: make_peft_adapter(base, spec, root / spec.name, seed=i) for i, spec in enumerate(specs)}


def check_bf16_against_hf_peft(
    base, adapters: dict, reference: tuple | None = None, batch: list | None = None, solo: bool = False,
    **llm_options,
) -> None:  # fmt: skip
    """kvrun in bf16 on the card, every adapter and base rows in one batch, against HF + PEFT teacher-forced in fp32
    (and HF + PEFT's own bf16 error, which bounds kvrun's). reference: (base, adapters) HF + PEFT runs instead, for a
    family transformers has no class for. batch: (prompt, adapter) rows instead of random prompts. solo: HF + PEFT
    with each row's adapter alone (PEFT cannot hold a second adapter beside one with trainable tokens)."""
    from kvrun import LLM, SamplingParams

    llm = LLM(str(base), dtype="bfloat16", max_loras=len(adapters), max_num_seqs=16, gpu_memory_utilization=0.1,
              **llm_options)  # several test processes share the card
    for name, directory in adapters.items():
        llm.load_adapter(name, directory)
    if batch is None:
        generator = torch.Generator().manual_seed(0)
        names = [*adapters, None, *adapters, None]
        batch = [(torch.randint(3, 1000, (9 + 13 * i,), generator=generator).tolist(), a) for i, a in enumerate(names)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
    outputs = llm.generate([p for p, _ in batch], params, adapters=[a for _, a in batch])
    llm.shutdown()  # tensor-parallel workers give their cards back
    del llm
    references = {}
    reference_base, reference_adapters = reference or (base, adapters)
    for dtype in (torch.float32, torch.bfloat16):
        groups = {name: {name: path} for name, path in reference_adapters.items()} if solo else {"": reference_adapters}
        references[dtype] = [None] * len(batch)
        for group, served in groups.items():
            peft = hf_peft(reference_base, served, dtype)
            for row, (output, (prompt, adapter)) in enumerate(zip(outputs, batch)):
                # every row in one model, or each adapter's rows in its own (base rows in the first, adapter disabled)
                if references[dtype][row] is None and (not solo or adapter in (group, None)):
                    references[dtype][row] = teacher_forced(peft, prompt, adapter, output.token_ids)
            del peft
    exact = near = total = 0
    ours_errors, hf_errors = [], []
    for row, (output, (_, adapter)) in enumerate(zip(outputs, batch)):
        reference, hf_bf16 = references[torch.float32][row], references[torch.bfloat16][row]
        for step, token in enumerate(output.token_ids):
            exact += int(reference[step].argmax()) == token
            near += float(reference[step].max() - reference[step, token]) <= NEAR_TIE_NATS
            total += 1
            ours_errors.append((abs(output.logprobs[step][token] - float(reference[step, token])), adapter, step))
            hf_errors.append(abs(float(hf_bf16[step, token] - reference[step, token])))
    ours_max, adapter, step = max(ours_errors)
    ours_mean = sum(e for e, _, _ in ours_errors) / total
    hf_max, hf_mean = max(hf_errors), sum(hf_errors) / total
    print(f"{base.parent.name}: kvrun bf16 error mean {ours_mean:.4f} max {ours_max:.4f} | HF+PEFT bf16 error mean "
          f"{hf_mean:.4f} max {hf_max:.4f} | greedy agreement {exact}/{total}, with near-ties {near}/{total}")
    assert ours_max <= max(LOGPROB_ATOL, 2 * hf_max), (adapter, step, ours_max, hf_max)
    assert ours_mean <= 1.5 * hf_mean + 0.01, (ours_mean, hf_mean)
    assert exact / total >= EXACT_AGREEMENT, f"greedy agreement {exact}/{total}"
    assert near / total >= TIE_AWARE_AGREEMENT, f"agreement counting near-ties {near}/{total}"


def hf_peft(base, adapters, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation="eager").cuda()
    names = list(adapters)
    peft = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(adapters[name], adapter_name=name)
    return peft.eval()


def test_baichuan2_bf16_cuda_path_matches_its_reference(tmp_path):
    """Baichuan 2 (W_pack, NormHead) against its reference built from HF Llama, as tests/models/test_baichuan.py does."""
    from tests.models.test_baichuan import baichuan_with_reference

    shape = {**GPU_SHAPE, "num_key_value_heads": GPU_SHAPE["num_attention_heads"]}  # Baichuan 2 7B has no GQA
    base, adapters, reference_dir, references = baichuan_with_reference(tmp_path, seed=1, std=0.02, **shape)
    check_bf16_against_hf_peft(base, adapters, reference=(reference_dir, references), max_lora_rank=16,
                               cuda_graphs=True)  # fmt: skip
