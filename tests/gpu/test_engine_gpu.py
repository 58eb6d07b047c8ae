"""The CUDA path (FlashInfer attention, Triton LoRA kernels, CUDA graphs) against the references, in bf16.

Tolerances, stated once: bf16 rounds every matmul, so kvrun and HF + PEFT (also bf16) may pick a different token where
the top two are nearly tied. Each row is therefore checked teacher-forced: HF + PEFT runs once over the prompt plus
kvrun's own tokens. At every step kvrun's log-probability for its token must be within 0.1 of HF's; kvrun's token
must be HF's argmax on at least 95% of steps, and on at least 99% of steps it must be the argmax or a near-tie (HF
rates it within 0.05 nats of its argmax: random-weight models have many, and bf16 rounding decides those). FlashInfer vs the torch reference attention: max abs error 2e-2 on unit-scale
inputs.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from tests.factories import MIXED_ADAPTERS, make_adapter  # noqa: E402

EXACT_AGREEMENT = 0.95
TIE_AWARE_AGREEMENT = 0.99
NEAR_TIE_NATS = 0.05
LOGPROB_ATOL = 0.1


def llama_dir(path, *, hidden, heads, kv_heads, layers, intermediate, vocab, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module", params=["tiny-gqa", "smollm2-shaped"])
def gpu_model(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "tiny-gqa":
        base = llama_dir(root / "base", hidden=256, heads=4, kv_heads=2, layers=2, intermediate=512, vocab=512)
    else:
        base = llama_dir(root / "base", hidden=576, heads=9, kv_heads=3, layers=30, intermediate=1536, vocab=49152)
    adapters = {spec.name: make_adapter(base, spec, root / spec.name, seed=i + 1) for i, spec in enumerate(MIXED_ADAPTERS)}
    return base, adapters


def rows(adapter_names, vocab):
    generator = torch.Generator().manual_seed(0)
    names = [*adapter_names, None, *adapter_names, None]
    return [(torch.randint(3, vocab - 1, (5 + 7 * i,), generator=generator).tolist(), name) for i, name in enumerate(names)]


def hf_peft(base, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).cuda()
    names = list(adapters)
    peft = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(adapters[name], adapter_name=name)
    return peft.eval()


@torch.no_grad()
def teacher_forced(peft, prompt, adapter, tokens):
    ids = torch.tensor([prompt + tokens], device="cuda")
    if adapter is None:
        with peft.disable_adapter():
            logits = peft(ids).logits[0]
    else:
        peft.set_adapter(adapter)
        logits = peft(ids, **alora_offsets(peft, prompt, adapter, len(tokens))).logits[0]
    return torch.log_softmax(logits[len(prompt) - 1 : -1].float(), dim=-1)


def alora_offsets(peft, prompt, adapter, num_generated) -> dict:
    """An activated LoRA's offsets as PEFT's generate() finds them (in the prompt alone, the generated tokens all
    activated), for one teacher-forced pass over prompt + generated tokens; {} for another adapter."""
    if not getattr(peft.peft_config[adapter], "alora_invocation_tokens", None):
        return {}
    from peft.tuners.lora.variants import calculate_alora_offsets

    offset = calculate_alora_offsets(peft.peft_config, adapter, torch.tensor([prompt]))[0]
    return {"alora_offsets": [None if offset is None else offset + num_generated]}


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_engine_bf16_matches_hf_peft(gpu_model, cuda_graphs):
    from kvrun import LLM, SamplingParams

    base, adapters = gpu_model
    llm = LLM(str(base), dtype="bfloat16", max_loras=4, max_lora_rank=16, max_num_seqs=16, cuda_graphs=cuda_graphs,
              gpu_memory_utilization=0.1)  # several test processes share the card
    for name, directory in adapters.items():
        llm.load_adapter(name, directory)
    batch = rows(list(adapters), llm.engine.model_config.vocab_size)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
    outputs = llm.generate([p for p, _ in batch], params, adapters=[a for _, a in batch])
    del llm
    peft = hf_peft(base, adapters)
    exact = near = total = 0
    for output, (prompt, adapter) in zip(outputs, batch):
        reference = teacher_forced(peft, prompt, adapter, output.token_ids)
        for step, token in enumerate(output.token_ids):
            exact += int(reference[step].argmax()) == token
            near += float(reference[step].max() - reference[step, token]) <= NEAR_TIE_NATS
            total += 1
            ours = output.logprobs[step][token]
            assert abs(ours - float(reference[step, token])) <= LOGPROB_ATOL, (adapter, step)
    assert exact / total >= EXACT_AGREEMENT, f"greedy agreement {exact}/{total}"
    assert near / total >= TIE_AWARE_AGREEMENT, f"agreement counting near-ties {near}/{total}"


def test_steps_with_prompt_tokens_replayed_in_pieces_match_eager_steps(gpu_model, monkeypatch):
    """Chunked prompts beside running decodes (mixed steps), LoRA and base rows: the pieces captured between the
    attention calls give the eager step's tokens and log-probabilities, and they do run."""
    from kvrun import LLM, SamplingParams
    from kvrun.runtime.step_graphs import StepGraphs

    base, adapters = gpu_model
    replays = []
    run = StepGraphs.run
    monkeypatch.setattr(
        StepGraphs, "run", lambda self, batch, *more: replays.append(batch.num_tokens) or run(self, batch, *more)
    )
    outputs = {}
    for max_tokens in (0, 64):
        llm = LLM(str(base), dtype="bfloat16", max_loras=4, max_lora_rank=16, max_num_seqs=16,
                  max_num_batched_tokens=64, cuda_graph_max_tokens=max_tokens, gpu_memory_utilization=0.1)  # fmt: skip
        for name, directory in adapters.items():
            llm.load_adapter(name, directory)
        batch = rows(list(adapters), llm.engine.model_config.vocab_size)
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=0)
        outputs[max_tokens] = llm.generate([p for p, _ in batch], params, adapters=[a for _, a in batch])
        del llm
        assert bool(replays) == bool(max_tokens), replays
    assert any(count < 64 and count not in (16, 32) for count in replays)  # steps padded to a bucket ran too
    same = total = 0
    for eager, pieces in zip(outputs[0], outputs[64]):
        for step, (a, b) in enumerate(zip(eager.token_ids, pieces.token_ids)):
            total += 1
            if a != b:  # a bf16 near-tie decided otherwise: the rest of the row differs, compare no further
                break
            same += 1
            assert abs(eager.logprobs[step][a] - pieces.logprobs[step][b]) <= 0.05
    assert same / total >= EXACT_AGREEMENT, f"{same}/{total}"


@pytest.mark.parametrize("max_tokens", [0, 64])
def test_plans_wait_for_the_last_plans_copy_when_the_device_lags(gpu_model, monkeypatch, max_tokens):
    """Steps in which no row samples never wait for the device. With the device held back (a sleep queued before each
    plan), a long prompt's chunks, eager or in pieces, still give the tokens of an engine whose device keeps up:
    each plan waits until the last plan's copy from FlashInfer's pinned host buffer has run before refilling it."""
    from kvrun import LLM, SamplingParams
    from kvrun.runtime.attention.flashinfer import FlashInferBackend

    base, _ = gpu_model
    prompt = torch.randint(3, 500, (400,), generator=torch.Generator().manual_seed(5)).tolist()
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0)

    def run():
        llm = LLM(str(base), dtype="bfloat16", max_loras=0, max_num_seqs=4, max_num_batched_tokens=64,
                  cuda_graph_max_tokens=max_tokens, gpu_memory_utilization=0.1)  # fmt: skip
        output = llm.generate([prompt], params)[0]
        del llm
        return output

    expected = run()
    plan = FlashInferBackend.plan

    def lagging_plan(self, *args, **kwargs):
        torch.cuda._sleep(50_000_000)  # tens of ms of device time before this plan's copy
        return plan(self, *args, **kwargs)

    monkeypatch.setattr(FlashInferBackend, "plan", lagging_plan)
    lagging = run()
    assert lagging.token_ids == expected.token_ids
    for ours, theirs in zip(lagging.logprobs, expected.logprobs):
        assert ours.keys() == theirs.keys()
        assert all(abs(ours[token] - theirs[token]) <= 1e-3 for token in ours)


VARIANTS = {
    "plain": dict(),
    "sliding window": dict(sliding_window=24),
    "soft cap": dict(logits_soft_cap=5.0),
    "window + soft cap + scale": dict(sliding_window=9, logits_soft_cap=5.0, scale=0.05),
}


@pytest.mark.parametrize("variant_name", sorted(VARIANTS))
def test_flashinfer_matches_reference_attention(variant_name):
    from kvrun.runtime.attention.base import AttentionVariant

    dim = 128
    options = dict(VARIANTS[variant_name])
    compare_with_reference(AttentionVariant(options.pop("scale", dim**-0.5), **options), 32, 8, dim)


@pytest.mark.parametrize("kv_heads", [8, 32], ids=["tensor-core decode", "cuda-core decode"])
def test_flashinfer_alibi_uses_the_slopes_it_is_given(kv_heads):
    """A tensor-parallel rank's ALiBi heads: the second half of a 64-head model, whose slopes are not those of a
    32-head model (FlashInfer's own for 32 heads). Another backend of 32 heads with those default slopes plans in
    the same process before each step: each plan must put its own slopes in FlashInfer's shared buffer. Covers
    paged prefill and both decode kernels (tensor cores at 4 query heads per K/V head, CUDA cores without GQA)."""
    from kvrun.runtime.attention.base import AttentionVariant, alibi_slopes
    from kvrun.runtime.attention.flashinfer import FlashInferBackend

    dim = 128
    variant = AttentionVariant(dim**-0.5, alibi=True)
    other = FlashInferBackend(torch.device("cuda"), torch.bfloat16, 32, kv_heads, dim, (variant,), alibi_slopes(32))
    compare_with_reference(variant, 32, kv_heads, dim, alibi_slopes(64)[32:], before_plan=other.plan)


def compare_with_reference(variant, heads: int, kv_heads: int, dim: int, slopes=None, before_plan=None) -> None:
    """FlashInfer against the torch reference on one prefill and one decode step of four requests with pages in
    random order. before_plan(metadata): called before FlashInfer plans each step."""
    from kvrun.runtime.attention.base import AttentionMetadata
    from kvrun.runtime.attention.flashinfer import FlashInferBackend
    from kvrun.runtime.attention.torch_ref import TorchReferenceBackend

    torch.manual_seed(0)
    page = 16
    prior = [0, 17, 40, 5]  # tokens already in the cache per request
    new = [9, 1, 33, 16]
    pages_needed = [-(-(p + n) // page) for p, n in zip(prior, new)]
    kv = torch.randn(sum(pages_needed) + 1, 2, page, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    flash = FlashInferBackend(torch.device("cuda"), torch.bfloat16, heads, kv_heads, dim, (variant,), slopes)
    reference = TorchReferenceBackend(heads, kv_heads, dim, slopes)
    page_ids = torch.randperm(sum(pages_needed)).tolist()
    tables, start = [], 0
    for count in pages_needed:
        tables.append(page_ids[start : start + count])
        start += count
    for is_prefill, queries in ((True, new), (False, [1] * len(new))):
        seq = [p + q for p, q in zip(prior, queries)]
        slots = [t[pos // page] * page + pos % page for t, p, s in zip(tables, prior, seq) for pos in range(p, s)]
        metadata = AttentionMetadata(
            is_prefill=is_prefill,
            qo_indptr=torch.tensor([0, *torch.tensor(queries).cumsum(0).tolist()], dtype=torch.int32),
            kv_indptr=torch.tensor([0, *torch.tensor(pages_needed).cumsum(0).tolist()], dtype=torch.int32),
            kv_page_indices=torch.tensor([i for t in tables for i in t], dtype=torch.int32),
            kv_last_page_len=torch.tensor([s - (len(t) - 1) * page for s, t in zip(seq, tables)], dtype=torch.int32),
            seq_lens=torch.tensor(seq, dtype=torch.int32),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device="cuda"),
            page_size=page,
            query_lens_host=list(queries),
            seq_lens_host=seq,
        )
        if not is_prefill:  # decode needs each table to cover exactly seq pages
            metadata.kv_indptr = torch.tensor([0, *torch.tensor([-(-s // page) for s in seq]).cumsum(0).tolist()], dtype=torch.int32)
            metadata.kv_page_indices = torch.tensor([i for t, s in zip(tables, seq) for i in t[: -(-s // page)]], dtype=torch.int32)
            metadata.kv_last_page_len = torch.tensor([s - (-(-s // page) - 1) * page for s in seq], dtype=torch.int32)
        total = sum(queries)
        q = torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(total, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(total, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
        cache_a, cache_b = kv.clone(), kv.clone()
        if before_plan is not None:
            before_plan(metadata)
        flash.plan(metadata)
        got = flash.forward(q, k, v, cache_a, variant)
        reference.plan(metadata)
        want = reference.forward(q, k, v, cache_b, variant)
        torch.testing.assert_close(cache_a, cache_b)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
