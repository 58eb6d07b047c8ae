"""Structured output on the GPU: the token bitmask is applied on the logits' device (exactly as on the CPU), and a
CUDA engine (FlashInfer, CUDA graphs) follows every row's grammar in a mixed batch with unconstrained rows.

The model is a random Llama with a byte-level BPE tokenizer trained here (no download): xgrammar needs a real
tokenizer, and the tokenizer's vocabulary is the model's."""

from __future__ import annotations

import json
import re

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from kvrun.runtime.sampler import SampledToken, SamplingRow, TokenBitmask, apply_token_bitmask, sample  # noqa: E402

VOCAB = 49152


def _bits(rows: int, words: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31 - 1, (rows, words), dtype=torch.int32, generator=generator)


@pytest.mark.parametrize("rows", [[0, 1, 2, 3, 4, 5, 6, 7], [1, 3, 6], [7]])
def test_the_mask_is_applied_on_the_device_exactly_as_on_the_cpu(rows):
    scores = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(0))
    bits = _bits(len(rows), (VOCAB + 31) // 32 - 2, seed=1)  # narrower than the logits: the tail is never allowed
    on_cpu, on_gpu = scores.clone(), scores.cuda()
    apply_token_bitmask(on_cpu, TokenBitmask(rows, bits))
    apply_token_bitmask(on_gpu, TokenBitmask(rows, bits))
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), on_cpu)
    assert torch.isinf(on_cpu[rows[0], -64:]).all()


def test_sampling_on_the_device_keeps_every_row_inside_its_mask():
    from kvrun import SamplingParams

    logits = torch.randn(6, VOCAB, device="cuda", generator=torch.Generator("cuda").manual_seed(2)) * 4
    bits = torch.zeros(3, (VOCAB + 31) // 32, dtype=torch.int32)
    allowed_tokens = {0: {5, 77, 40000}, 2: {9}, 5: set(range(1000, 1032))}
    for position, row in enumerate(sorted(allowed_tokens)):
        for token in allowed_tokens[row]:
            bits[position, token // 32] |= torch.tensor(1 << (token % 32)).to(torch.int32)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=1.2)]
    rows = [SamplingRow(p, torch.Generator("cuda").manual_seed(i), [1], []) for i, p in enumerate(params)]
    results = sample(logits.clone(), rows, TokenBitmask(sorted(allowed_tokens), bits))
    assert all(isinstance(result, SampledToken) for result in results)
    for row, tokens in allowed_tokens.items():
        assert results[row].token_id in tokens
    masked = logits[0].clone()
    masked[[t for t in range(VOCAB) if t not in allowed_tokens[0]]] = -float("inf")
    assert results[0].token_id == int(masked.argmax())
    assert results[3].token_id == int(logits[3].argmax())  # an unconstrained greedy row is untouched


@pytest.fixture(scope="module")
def model_with_tokenizer(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("structured-gpu")
    corpus = [f'{{"name": "item {i}", "ok": {str(i % 2 == 0).lower()}, "count": {i}}} red green blue 555-{i:04d}'
              for i in range(2000)]  # fmt: skip
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(corpus, vocab_size=1024, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=trainer._tokenizer, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")  # fmt: skip
    tokenizer.save_pretrained(root)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root, safe_serialization=True)
    return root


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_a_cuda_engine_follows_every_rows_grammar_in_a_mixed_batch(model_with_tokenizer, cuda_graphs):
    from kvrun import LLM, SamplingParams
    from kvrun.engine.sampling_params import StructuredOutputParams

    llm = LLM(str(model_with_tokenizer), dtype="bfloat16", max_loras=0, max_num_seqs=16, cuda_graphs=cuda_graphs,
              gpu_memory_utilization=0.1)  # several test processes share the card
    assert llm.engine.runner.device.type == "cuda"
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "colour": {"enum": ["red", "green"]}},
              "required": ["ok", "colour"]}  # fmt: skip
    specs = [StructuredOutputParams(json=schema), StructuredOutputParams(regex="555-[0-9]{4}"),
             StructuredOutputParams(choice=("red", "green", "blue")), None, StructuredOutputParams(json=schema), None]
    params = [SamplingParams(max_tokens=48, temperature=0.0 if i % 2 else 0.9, seed=i, structured_output=spec,
                             ignore_eos=spec is None) for i, spec in enumerate(specs)]  # fmt: skip
    outputs = llm.generate([f"item {i}:" for i in range(len(specs))], params)
    for spec, output in zip(specs, outputs):
        if spec is None:
            assert output.finish_reason == "length" and len(output.token_ids) == 48
        elif spec.json is not None:
            value = json.loads(output.text)
            assert isinstance(value["ok"], bool) and value["colour"] in ("red", "green") and set(value) == {"ok", "colour"}
        elif spec.regex is not None:
            assert re.fullmatch("555-[0-9]{4}", output.text)
        else:
            assert output.text in spec.choice
        if spec is not None:
            assert output.finish_reason == "stop", output
