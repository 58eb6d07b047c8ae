"""Activated LoRA (PEFT's alora_invocation_tokens), made by PEFT on a tiny random Llama (fp32) and served in mixed
batches with a plain LoRA and base rows: the adapter applies from the last invocation in the prompt on, base before
it, and nowhere when the prompt holds none. Each row's greedy tokens equal HF + PEFT generate() run on that row
alone (generate computes the activation point from the prompt, as kvrun does), logprobs within 1e-4 relative."""

from __future__ import annotations

import pytest
import torch

from kvrun import LLM, SamplingParams
from kvrun.adapters.ref import NEVER, AdapterRef
from kvrun.runtime.forward_batch import BASE_SLOT, ScheduledRequest
from kvrun.runtime.step_layout import layout_step
from tests.adapters.test_peft_features import PLAIN, FeatureModel
from tests.models.families import PeftSpec

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

INVOKE = [251, 252, 253]  # prompts below draw other tokens from [3, 250), so the invocation is only where placed
ALORA = "alora"
MAX_TOKENS = 5
RTOL = 1e-4


def _random(length: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# prompt name → prompt; the activation point falls in different blocks (block_size 4) and chunks
PROMPTS = {
    "middle": _random(5, 1) + INVOKE + _random(6, 2),
    "twice": _random(3, 3) + INVOKE + _random(4, 4) + INVOKE + _random(2, 5),  # the last one counts
    "at the end": _random(9, 6) + INVOKE,
    "at the start": INVOKE + _random(7, 7),
    "absent": _random(10, 8),
    "cut short": _random(8, 9) + INVOKE[:2],  # a partial invocation is no invocation
}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> FeatureModel:
    model = FeatureModel("llama", tmp_path_factory.mktemp("alora"))
    family = model.family
    # lora_bias and a per-module rank too: both apply on the activated tokens alone, as PEFT's aLoRA forward does
    model.add(PeftSpec(ALORA, 4, [*family.attention, *family.mlp], alpha=8.0,
                       extra={"alora_invocation_tokens": INVOKE, "task_type": "CAUSAL_LM", "lora_bias": True,
                              "rank_pattern": {family.mlp[0]: 6}}))  # fmt: skip
    return model


class GenerateReference:
    """HF transformers + PEFT generate(), one row at a time (PEFT finds aLoRA's activation point in generate)."""

    def __init__(self, model: FeatureModel) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model.base, dtype=torch.float32, attn_implementation="eager")
        base.generation_config.eos_token_id = None  # kvrun's rows run with ignore_eos
        names = [ALORA, PLAIN]
        self.model = PeftModel.from_pretrained(base, model.adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(model.adapters[name], adapter_name=name)
        self.model.eval()

    @torch.no_grad()
    def greedy(self, prompt: list[int], adapter: str | None, **extra) -> tuple[list[int], list[torch.Tensor]]:
        options = dict(max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True,
                       pad_token_id=0, **extra)  # fmt: skip
        if adapter is None:
            with self.model.disable_adapter():
                out = self.model.generate(input_ids=torch.tensor([prompt]), **options)
        else:
            self.model.set_adapter(adapter)
            out = self.model.generate(input_ids=torch.tensor([prompt]), **options)
        tokens = out.sequences[0, len(prompt) :].tolist()
        return tokens, [torch.log_softmax(logits[0].float(), dim=-1) for logits in out.logits]


@pytest.fixture(scope="module")
def reference(model) -> GenerateReference:
    return GenerateReference(model)


def _llm(model: FeatureModel, **options) -> LLM:
    llm = LLM(str(model.base), max_loras=2, max_lora_rank=8, num_blocks=96, block_size=4, **options)
    llm.load_adapter(ALORA, model.adapters[ALORA])
    llm.load_adapter(PLAIN, model.adapters[PLAIN])
    return llm


def _rows() -> list[tuple[list[int], str | None]]:
    """Every aLoRA prompt, beside plain-LoRA and base rows (one of them the 'middle' prompt: base tokens and K/V
    that equal the aLoRA row's before its invocation)."""
    rows = [(prompt, ALORA) for prompt in PROMPTS.values()]
    rows += [(_random(7, 10), PLAIN), (PROMPTS["middle"], PLAIN), (PROMPTS["middle"], None), (_random(12, 11), None)]
    return rows


def _check(llm: LLM, rows, reference: GenerateReference) -> None:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=5, ignore_eos=True)
    outputs = llm.generate([prompt for prompt, _ in rows], params, adapters=[adapter for _, adapter in rows])
    for output, (prompt, adapter) in zip(outputs, rows):
        tokens, logprobs = reference.greedy(prompt, adapter)
        assert output.token_ids == tokens, f"adapter {adapter}, prompt {prompt}: greedy tokens differ"
        for step, expected in enumerate(logprobs):
            for token_id, value in output.logprobs[step].items():
                want = float(expected[token_id])
                assert abs(value - want) <= RTOL * max(1.0, abs(want)), (adapter, prompt, step, token_id, value, want)


def test_activated_lora_matches_peft_generate_in_a_mixed_batch(model, reference):
    _check(_llm(model), _rows(), reference)


def test_activated_lora_matches_peft_with_chunked_prefill(model, reference):
    """A 5-token step budget: the activation point falls at a chunk's start, inside one, or in a later chunk."""
    _check(_llm(model, max_num_batched_tokens=5, max_num_seqs=4), _rows(), reference)


def test_activated_lora_differs_from_base_and_from_the_adapter_on_every_token(reference):
    """The parity tests can fail both ways: the adapter changes the logits after the invocation, and applying it to
    the whole prompt (a plain LoRA) changes them differently."""
    prompt = PROMPTS["middle"]
    _, activated = reference.greedy(prompt, ALORA)
    _, base = reference.greedy(prompt, None)
    _, everywhere = reference.greedy(prompt, ALORA, alora_offsets=[len(prompt)])
    assert not torch.allclose(activated[0], base[0], rtol=1e-3)
    assert not torch.allclose(activated[0], everywhere[0], rtol=1e-3)


def test_base_prefix_blocks_are_shared_with_base_requests_and_keys_follow_the_activation_point(model, reference):
    """Blocks wholly before the invocation hold base K/V, shared with base requests; the blocks from it on are keyed
    by the activation point too, so the same tokens activated elsewhere (a later invocation) never share them."""
    llm = _llm(model)
    prefix = _random(8, 12)  # two full blocks
    stats = llm.engine.scheduler.stats
    _check(llm, [(prefix + _random(3, 13), None)], reference)
    hits = stats.prefix_cache_hits
    once = prefix + INVOKE + _random(6, 14)
    _check(llm, [(once, ALORA)], reference)
    assert stats.prefix_cache_hits - hits == 8  # the base request's two blocks
    # `once` again, now followed by a second invocation: its first 17 tokens equal `once`'s, whose blocks from the
    # invocation on ran the adapter; here they run the base model, so only the base prefix may be shared.
    hits = stats.prefix_cache_hits
    _check(llm, [(once + INVOKE + _random(2, 15), ALORA)], reference)
    assert stats.prefix_cache_hits - hits == 8
    hits = stats.prefix_cache_hits
    _check(llm, [(once, ALORA)], reference)  # the same prompt again shares its whole prefix
    assert stats.prefix_cache_hits - hits == 16
    # Equal tokens through the block holding the start, started at another position of it: an invocation that
    # begins in that block and ends in the next moves the start, so that block's K/V differ and must not be shared.
    head = prefix + INVOKE + INVOKE[:1]
    _check(llm, [(head + _random(4, 16), ALORA)], reference)  # starts at 8
    hits = stats.prefix_cache_hits
    _check(llm, [(head + INVOKE[1:] + _random(3, 17), ALORA)], reference)  # starts at 11
    assert stats.prefix_cache_hits - hits == 8


def test_start_position_is_the_last_invocation_or_never():
    ref = AdapterRef("a", 1, "0" * 64, 4, 8.0, ("q_proj",), invocation_tokens=(7, 8))
    assert ref.start_position([1, 7, 8, 2, 7, 8, 3]) == 4
    assert ref.start_position([7, 8]) == 0
    assert ref.start_position([1, 7, 2, 8, 7]) == NEVER
    assert AdapterRef("b", 1, "0" * 64, 4, 8.0, ("q_proj",)).start_position([1, 2]) == 0


def test_a_row_splits_into_a_base_segment_and_an_adapter_segment():
    def row(slot: int, start: int, count: int, adapter_start: int) -> ScheduledRequest:
        return ScheduledRequest("r", list(range(count)), start, list(range(8)), slot, 0.0, 1.0, 0, None, None,
                                adapter_start=adapter_start)  # fmt: skip

    layout = layout_step([row(BASE_SLOT, 0, 3, 0), row(0, 0, 6, 4), row(0, 4, 3, 2), row(1, 8, 2, 9)], block_size=4)
    assert layout.seg_slots == [BASE_SLOT, 0, BASE_SLOT, 1]
    assert layout.seg_indptr == [0, 7, 12, 13, 14]
