"""Tensor parallelism on two GPUs (NCCL, FlashInfer per shard, CUDA graphs with the all-reduces inside) against one
GPU, on a mixed batch of adapters and base rows, in bf16.

TP=2 adds the row-parallel partial matmuls in a different order than TP=1, so two greedy bf16 runs may part ways at a
near-tie and go on along different, equally valid paths (measured on 2x H200: 146 of 192 tokens before each row's
first difference); their tokens compared with each other say little. Each run is therefore checked teacher-forced
against HF + PEFT in fp32 on its own tokens: TP=2's logprob error must stay within 1.5x TP=1's mean (+ 0.01 nats) and
max(0.1, 2x TP=1's worst step), and its token must be the fp32 argmax on >= 95% of steps and the argmax or a
near-tie (<= 0.05 nats) on >= 99%. Every row's first token must agree between the two runs. The weights are wide
(std 0.05) so ties are rare.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

from tests.factories import MIXED_ADAPTERS, make_adapter  # noqa: E402
from tests.gpu.test_engine_gpu import NEAR_TIE_NATS, teacher_forced  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tp-gpu")
    torch.manual_seed(0)
    # 8 query heads over 2 K/V heads: each rank holds 4 query heads and one K/V head (FlashInfer's GQA group 4).
    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.05)
    base = root / "base"
    model.save_pretrained(base, safe_serialization=True)
    adapters = {spec.name: make_adapter(base, spec, root / spec.name, seed=i + 1) for i, spec in enumerate(MIXED_ADAPTERS)}
    return base, adapters


def generate(base, adapters, tensor_parallel_size: int, cuda_graphs: bool, async_scheduling: bool | None = None,
             step_tokens: int | None = None):  # fmt: skip
    from kvrun import LLM, SamplingParams

    llm = LLM(str(base), tensor_parallel_size=tensor_parallel_size, cuda_graphs=cuda_graphs, max_loras=4,
              max_lora_rank=16, num_blocks=512, max_num_seqs=16, async_scheduling=async_scheduling,
              max_num_batched_tokens=step_tokens)  # fmt: skip
    try:
        for name, directory in adapters.items():
            llm.load_adapter(name, directory)
        generator = torch.Generator().manual_seed(1)
        names = [*adapters, None]
        rows = [(torch.randint(3, 1000, (4 + 3 * i,), generator=generator).tolist(), names[i % len(names)])
                for i in range(12)]  # fmt: skip
        # Rows end at different steps: under async scheduling a row that ended has run one step too many, dropped.
        params = [SamplingParams(max_tokens=10 + 2 * (i % 4), temperature=0.0, ignore_eos=True, logprobs=0)
                  for i in range(len(rows))]  # fmt: skip
        return rows, llm.generate([p for p, _ in rows], params, adapters=[a for _, a in rows])
    finally:
        llm.shutdown()


def fp32_errors(peft, rows, outputs) -> tuple[float, float, float, float]:
    """Mean and worst logprob error against fp32, and the share of steps on its argmax / argmax-or-near-tie."""
    errors, exact, near = [], 0, 0
    for (prompt, adapter), output in zip(rows, outputs):
        reference = teacher_forced(peft, prompt, adapter, output.token_ids)
        for step, token in enumerate(output.token_ids):
            errors.append(abs(output.logprobs[step][token] - float(reference[step, token])))
            exact += int(reference[step].argmax()) == token
            near += float(reference[step].max() - reference[step, token]) <= NEAR_TIE_NATS
    return sum(errors) / len(errors), max(errors), exact / len(errors), near / len(errors)


@pytest.mark.parametrize(
    ("cuda_graphs", "async_scheduling", "step_tokens"),
    [(True, None, None), (False, None, None), (True, True, 64), (False, True, 64)],
    ids=["graphs", "eager", "async-graphs", "async-eager"],
)
def test_two_gpus_match_one(checkpoint, cuda_graphs, async_scheduling, step_tokens):
    """async-*: TP=2 with async scheduling (rank 0 broadcasts each step's sampled tokens to rank 1), with a 64-token
    step budget, so prompts arrive in chunks beside decode rows that read their token on the device (captured in
    pieces, or eager)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapters = checkpoint
    runs = {1: generate(base, adapters, 1, cuda_graphs, step_tokens=step_tokens)}
    runs[2] = generate(base, adapters, 2, cuda_graphs, async_scheduling, step_tokens)
    assert all(one.token_ids[0] == two.token_ids[0] for one, two in zip(runs[1][1], runs[2][1])), "a first token differs"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).cuda()
    names = list(adapters)
    peft = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(adapters[name], adapter_name=name)
    peft.eval()
    stats = {size: fp32_errors(peft, *runs[size]) for size in (1, 2)}
    for size, (mean, worst, exact, near) in stats.items():
        print(f"TP={size} cuda_graphs={cuda_graphs}: logprob error vs fp32 mean {mean:.4f} max {worst:.4f}; "
              f"fp32 argmax on {exact:.1%} of steps, argmax or near-tie on {near:.1%}")
    (mean1, worst1, _, _), (mean2, worst2, exact2, near2) = stats[1], stats[2]
    assert mean2 <= 1.5 * mean1 + 0.01 and worst2 <= max(0.1, 2 * worst1), stats
    assert exact2 >= 0.95 and near2 >= 0.99, stats


@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_alibi_families_on_two_gpus_match_hf_peft(family, tmp_path):
    """BLOOM and MPT split over two GPUs (two of the four heads each, with the whole model's slopes of its heads
    copied into FlashInfer's slope buffer at each plan), CUDA graphs on, mixed adapters and base rows, against HF +
    PEFT in fp32 under the bounds of tests/gpu/test_families_gpu.py."""
    from tests.gpu.test_families_gpu import check_bf16_against_hf_peft, family_checkpoint

    base, adapters = family_checkpoint(family, tmp_path)
    check_bf16_against_hf_peft(base, adapters, max_lora_rank=16, cuda_graphs=True, tensor_parallel_size=2)


def test_dora_and_lora_bias_on_two_gpus_match_hf_peft(tmp_path):
    """DoRA (row-parallel norms summed over the two GPUs by NCCL at slot write, the rescaling in the Triton expand
    epilogue on each rank's partial output) and lora_bias beside a plain adapter and base rows, CUDA graphs on,
    against HF + PEFT in fp32 under the bounds of tests/gpu/test_families_gpu.py."""
    from tests.gpu.test_families_gpu import check_bf16_against_hf_peft
    from tests.gpu.test_peft_features_gpu import feature_checkpoint

    base, adapters = feature_checkpoint("llama", tmp_path)
    check_bf16_against_hf_peft(base, adapters, max_lora_rank=16, cuda_graphs=True, tensor_parallel_size=2)
