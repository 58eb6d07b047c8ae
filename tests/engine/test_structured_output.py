"""Structured output through the engine on the bundled SmolLM2: constrained rows follow their grammars inside a
mixed batch, greedy constrained decoding equals HF transformers greedy under xgrammar's own mask, and rows without
a grammar produce exactly their solo tokens."""

from __future__ import annotations

import json
import re

import pytest
import torch
import xgrammar
from pydantic import BaseModel, Field
from transformers import AutoModelForCausalLM

from kvrun import LLM, SamplingParams
from kvrun.engine.sampling_params import StructuredOutputParams
from kvrun.runtime.loader import resolve_model


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=150)


PERSON = StructuredOutputParams(json=Person.model_json_schema())
PHONE = r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"


def chat(llm: LLM, text: str) -> str:
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip


@pytest.fixture(scope="module")
def hf_model():
    return AutoModelForCausalLM.from_pretrained(resolve_model(None), dtype=torch.float32).eval()


def hf_constrained_greedy(model, tokenizer, prompt: list[int], schema: dict, max_tokens: int) -> list[int]:
    """HF transformers greedy decoding, each step's logits masked by xgrammar's own matcher and kernel."""
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=model.config.vocab_size,
                                                   stop_token_ids=[tokenizer.eos_token_id])  # fmt: skip
    compiled = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False)
    matcher = xgrammar.GrammarMatcher(compiled)
    bitmask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
    output, past, step_ids = [], None, list(prompt)
    for _ in range(max_tokens):
        with torch.no_grad():
            result = model(torch.tensor([step_ids]), past_key_values=past, use_cache=True)
        logits, past = result.logits[0, -1:].float().clone(), result.past_key_values
        matcher.fill_next_token_bitmask(bitmask)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask, backend="cpu")
        token = int(logits[0].argmax())
        assert matcher.accept_token(token)
        output.append(token)
        step_ids = [token]
        if matcher.is_terminated():
            break
    return output


def test_constrained_rows_follow_their_grammars_in_one_mixed_batch(bundled_llm, hf_model):
    llm = bundled_llm
    person_prompt = chat(llm, "Give me a JSON object for a person named Alice who is 30 years old.")
    story = "Once upon a time"
    rows = [
        (person_prompt, SamplingParams(max_tokens=32, temperature=0.0, structured_output=PERSON)),
        (chat(llm, "Is the sky blue? Answer yes or no."),
         SamplingParams(max_tokens=8, temperature=0.0, structured_output=StructuredOutputParams(choice=("yes", "no")))),
        (story, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)),
        (chat(llm, "Write a US phone number."),
         SamplingParams(max_tokens=20, temperature=0.0, structured_output=StructuredOutputParams(regex=PHONE))),
        # n = 2 of one call: the same spec, each choice with its own matcher and seed.
        *[(chat(llm, "Pick a colour."), SamplingParams(max_tokens=8, temperature=1.0, seed=seed,
          structured_output=StructuredOutputParams(choice=("red", "green", "blue")))) for seed in (1, 2)],
        (chat(llm, "Describe a cat as JSON."),
         SamplingParams(max_tokens=24, temperature=0.7, seed=3, structured_output=StructuredOutputParams(json_object=True))),
    ]  # fmt: skip
    outputs = llm.generate([prompt for prompt, _ in rows], [params for _, params in rows])
    person, answer, plain, phone, colour_a, colour_b, cat = outputs
    assert person.finish_reason == "stop", person.text
    Person.model_validate_json(person.text)  # the real output parses against the schema
    prompt_ids = llm.engine.tokenize(person_prompt)
    assert person.token_ids == hf_constrained_greedy(hf_model, llm.tokenizer, prompt_ids, PERSON.json, 32)
    assert answer.text in ("yes", "no") and answer.finish_reason == "stop"
    assert re.fullmatch(PHONE, phone.text) and phone.finish_reason == "stop"
    assert {colour_a.text, colour_b.text} <= {"red", "green", "blue"}
    assert cat.text.startswith("{")
    if cat.finish_reason == "stop":
        assert isinstance(json.loads(cat.text), dict)
    solo = llm.generate(story, rows[2][1])[0]
    assert plain.token_ids == solo.token_ids  # a row without a grammar is untouched by its neighbours' masks


def test_stop_strings_ignore_eos_and_min_tokens_meet_a_grammar(bundled_llm):
    llm = bundled_llm
    phone = StructuredOutputParams(regex=PHONE)
    prompt = chat(llm, "Write a US phone number.")
    stopped, ended, starved, plain = llm.generate(
        [prompt, chat(llm, "Yes or no?"), chat(llm, "Yes or no?"), "Hello"],
        [SamplingParams(max_tokens=20, temperature=0.0, stop=[") "], structured_output=phone),
         # The grammar is complete after "yes"/"no" and the model ends it: ignore_eos cannot extend it.
         SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                        structured_output=StructuredOutputParams(choice=("yes", "no"))),
         # min_tokens holds EOS back, but after "no" the grammar allows nothing else: that row fails alone.
         SamplingParams(max_tokens=12, temperature=0.0, min_tokens=6,
                        structured_output=StructuredOutputParams(choice=("no",))),
         SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)],
    )  # fmt: skip
    assert stopped.finish_reason == "stop" and stopped.stop_reason == ") "
    assert re.fullmatch(r"\([0-9]{3}", stopped.text)
    assert ended.finish_reason == "stop" and ended.text in ("yes", "no")
    assert ended.token_ids[-1] == llm.tokenizer.eos_token_id and len(ended.token_ids) < 12
    assert starved.finish_reason == "error" and "no token is allowed" in starved.error and starved.text == "no"
    assert plain.finish_reason == "length" and len(plain.token_ids) == 3


def test_a_model_without_a_tokenizer_refuses_structured_output(tiny_gqa):
    base, _ = tiny_gqa
    llm = LLM(str(base), max_loras=0, num_blocks=16, block_size=4)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        llm.generate([1, 2, 3], SamplingParams(max_tokens=2, structured_output=StructuredOutputParams(regex="a")))
    assert not llm.engine.has_unfinished()


def test_a_failed_batch_mask_fill_falls_back_to_each_row_alone(bundled_llm, monkeypatch):
    """xgrammar's batch fill raising must not end the step: each row's mask is filled alone, and rows whose own
    fill works keep following their grammars."""

    class FailingBatch:
        def batch_fill_next_token_bitmask(self, *args, **kwargs):
            raise RuntimeError("batch fill failed")

    llm = bundled_llm
    monkeypatch.setattr(llm.engine.grammars(), "_batch", FailingBatch())
    choice = StructuredOutputParams(choice=("yes", "no"))
    outputs = llm.generate(
        [chat(llm, "Yes or no?"), chat(llm, "Is the sea blue?")],
        SamplingParams(max_tokens=8, temperature=0.0, structured_output=choice),
    )
    assert [(output.finish_reason, output.text in ("yes", "no")) for output in outputs] == [("stop", True)] * 2


def test_a_grammar_still_compiling_holds_up_no_other_request(bundled_llm, monkeypatch):
    """A large grammar compiles for seconds: its request's prompt may prefill meanwhile, but its sampling waits for
    the compile, never the step. Other requests stream and finish while it compiles; then it follows its grammar."""
    import threading

    llm = bundled_llm
    engine, compiler = llm.engine, llm.engine.grammars()
    release = threading.Event()
    compile_now = compiler.compile
    monkeypatch.setattr(compiler, "compile", lambda spec: (release.wait(60), compile_now(spec))[1])
    constrained = engine.add_request(
        llm.tokenizer.encode(chat(llm, "Pick a colour.")),
        SamplingParams(max_tokens=8, temperature=0.0,
                       structured_output=StructuredOutputParams(choice=("teal", "mauve", "ochre"))),
    )  # fmt: skip
    plain = engine.add_request(llm.tokenizer.encode("Hello"), SamplingParams(max_tokens=6, ignore_eos=True))
    for _ in range(50):
        engine.step()
        if plain.is_finished:
            break
    assert plain.is_finished and len(plain.output_token_ids) == 6
    assert not constrained.output_token_ids and constrained.num_computed_tokens > 0  # its prompt prefilled meanwhile
    release.set()
    while engine.has_unfinished():
        engine.step()
    assert constrained.finish_reason == "stop" and constrained.text in ("teal", "mauve", "ochre")
