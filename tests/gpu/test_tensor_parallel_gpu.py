"""Tensor parallelism on two GPUs (NCCL, FlashInfer per shard, CUDA graphs with the all-reduces inside): greedy tokens
of TP=2 against TP=1 on a mixed batch of adapters and base rows, in bf16.

Tolerance: the two runs add the same products in a different order (the row-parallel all-reduce sums two partial
matmuls), so bf16 rounding may flip a token where the top two are nearly tied; every row's first token must agree,
and at least 95% of all tokens must come before a row's first difference. The weights are wide (std 0.05) so ties
are rare.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

from tests.factories import MIXED_ADAPTERS, make_adapter  # noqa: E402

PREFIX_AGREEMENT = 0.95


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


def generate(base, adapters, tensor_parallel_size: int, cuda_graphs: bool) -> list[list[int]]:
    from kvrun import LLM, SamplingParams

    llm = LLM(str(base), tensor_parallel_size=tensor_parallel_size, cuda_graphs=cuda_graphs, max_loras=4,
              max_lora_rank=16, num_blocks=512, max_num_seqs=16)  # fmt: skip
    try:
        for name, directory in adapters.items():
            llm.load_adapter(name, directory)
        generator = torch.Generator().manual_seed(1)
        names = [*adapters, None]
        prompts = [torch.randint(3, 1000, (4 + 3 * i,), generator=generator).tolist() for i in range(12)]
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        outputs = llm.generate(prompts, params, adapters=[names[i % len(names)] for i in range(len(prompts))])
        return [output.token_ids for output in outputs]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "eager"])
def test_two_gpus_match_one(checkpoint, cuda_graphs):
    base, adapters = checkpoint
    single = generate(base, adapters, 1, cuda_graphs)
    parallel = generate(base, adapters, 2, cuda_graphs)
    assert all(one[0] == two[0] for one, two in zip(single, parallel)), "a row's first token differs"
    same = sum(next((i for i, (a, b) in enumerate(zip(one, two)) if a != b), len(one)) for one, two in zip(single, parallel))
    total = sum(len(one) for one in single)
    assert same / total >= PREFIX_AGREEMENT, f"only {same}/{total} tokens before each row's first difference"
