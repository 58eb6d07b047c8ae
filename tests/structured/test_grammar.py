"""Structured output below the engine: specs parsed (and refused with a clear reason), grammars compiled against
the bundled tokenizer, masks that allow exactly what the matcher accepts, applied on the logits, one row at a time."""

from __future__ import annotations

import math
import re
from concurrent.futures import Future

import pytest
import torch

from kvrun import SamplingParams
from kvrun.engine.sampling_params import StructuredOutputParams
from kvrun.engine.tokenizer import load_tokenizer
from kvrun.runtime.loader import resolve_model
from kvrun.runtime.sampler import SamplingFailure, SamplingRow, TokenBitmask, apply_token_bitmask, sample
from kvrun.structured.compiler import GrammarCompiler, RequestGrammar

EOS = 2  # the bundled tokenizer's <|im_end|>


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(None))


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, len(tokenizer), [EOS])


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (StructuredOutputParams(json={"type": "frob"}), 'Unsupported type "frob"'),
        (StructuredOutputParams(json="{not json"), "is not valid JSON"),
        (StructuredOutputParams(json="[1, 2]"), "must be a JSON schema object"),
        (StructuredOutputParams(regex="(ab"), "is not a regular expression kvrun can follow: Regex parsing error"),
        (StructuredOutputParams(choice=()), "must list at least one string"),
        (StructuredOutputParams(grammar="root ::= "), "is not an EBNF grammar kvrun can follow"),
    ],
)
def test_specs_that_cannot_be_followed_are_refused_with_the_reason(spec, words):
    with pytest.raises(ValueError) as raised:
        SamplingParams(structured_output=spec)
    message = str(raised.value)
    assert message.startswith("structured_output ") and words in message
    assert ".cc:" not in message and "/project" not in message  # xgrammar's source position is not the user's


def test_a_spec_names_exactly_one_language():
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputParams(regex="a", choice=("a",))
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputParams()
    same = StructuredOutputParams(json={"b": 1, "type": "object"}).key()
    assert same == StructuredOutputParams(json='{"type": "object", "b": 1}').key()


def accepts(compiler: GrammarCompiler, spec: StructuredOutputParams, text: str) -> bool:
    matcher = compiler.start(spec).matcher
    return matcher.accept_string(text) and matcher.is_completed()


def test_choices_are_matched_exactly_whatever_their_characters(compiler):
    choices = ("yes", 'say "no"', "back\\slash", "new\nline", "ünï ✓", "")
    spec = StructuredOutputParams(choice=choices)
    assert all(accepts(compiler, spec, choice) for choice in choices)
    assert not accepts(compiler, spec, "ye") and not accepts(compiler, spec, "yes ")


def test_json_is_compact_and_holds_only_declared_properties(compiler):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    spec = StructuredOutputParams(json=schema)
    assert accepts(compiler, spec, '{"a": 1}')
    assert not accepts(compiler, spec, '{"a": 1, "b": 2}') and not accepts(compiler, spec, '{\n  "a": 1\n}')
    anything = StructuredOutputParams(json_object=True)
    assert accepts(compiler, anything, '{"x": [1, {"y": null}]}') and not accepts(compiler, anything, "[1]")


def test_compiled_grammars_are_cached_by_spec(compiler):
    first = compiler.compile(StructuredOutputParams(regex="[0-9]{4}"))
    assert compiler.compile(StructuredOutputParams(regex="[0-9]{4}")) is first
    assert compiler.start(StructuredOutputParams(regex="[0-9]{4}")).matcher is not None


def test_the_mask_allows_exactly_the_tokens_the_grammar_accepts(compiler, tokenizer):
    spec = StructuredOutputParams(regex="[0-9]{2}-[a-c]+")
    pieces = [tokenizer.convert_tokens_to_string([token]) for token in tokenizer.convert_ids_to_tokens(range(len(tokenizer)))]
    for text in ("", "4", "42", "42-", "42-ab"):
        grammar = compiler.start(spec)
        assert grammar.matcher.accept_string(text)
        scores = torch.zeros(1, len(tokenizer))
        apply_token_bitmask(scores, compiler.bitmask({0: grammar}))
        permitted = set(torch.nonzero(scores[0] == 0).flatten().tolist())
        expected = {token_id for token_id, piece in enumerate(pieces)
                    if token_id != EOS and piece and re.fullmatch(r"[0-9]{0,2}|[0-9]{2}-[a-c]*", text + piece)}
        if re.fullmatch(r"[0-9]{2}-[a-c]+", text):
            expected.add(EOS)  # the language may end here
        assert permitted == expected, text
    grammar = compiler.start(spec)
    assert grammar.accept(tokenizer.convert_tokens_to_ids("4")) and not grammar.accept(tokenizer.convert_tokens_to_ids("a"))
    assert not grammar.terminated


def _masked(scores: torch.Tensor, bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """The reference: token t stays when bit t % 32 of word t // 32 is set (and the mask reaches t)."""
    words = bits.shape[0]
    allowed = [token < 32 * words and (int(bits[token // 32]) >> (token % 32)) & 1 == 1 for token in range(vocab)]
    return torch.where(torch.tensor(allowed), scores, torch.tensor(-math.inf))


def test_masks_apply_to_their_rows_only_and_past_the_mask_nothing_is_allowed():
    generator = torch.Generator().manual_seed(0)
    vocab = 100  # a 96-token mask (3 words) for 100 logits: tokens 96..99 are never allowed
    scores = torch.randn(4, vocab, generator=generator)
    bits = torch.randint(-(2**31), 2**31 - 1, (2, 3), dtype=torch.int32, generator=generator)
    some = scores.clone()
    apply_token_bitmask(some, TokenBitmask([1, 3], bits))  # some rows of the batch: the indexed path
    assert torch.equal(some[1], _masked(scores[1], bits[0], vocab)) and torch.equal(some[3], _masked(scores[3], bits[1], vocab))
    assert torch.equal(some[0], scores[0]) and torch.equal(some[2], scores[2])
    every = scores[:2].clone()
    apply_token_bitmask(every, TokenBitmask([0, 1], bits))  # every row: in place
    assert torch.equal(every[0], _masked(scores[0], bits[0], vocab)) and torch.equal(every[1], _masked(scores[1], bits[1], vocab))


def test_a_grammar_that_cannot_compile_fails_its_row_alone(compiler, tokenizer):
    broken: Future = Future()
    broken.set_exception(RuntimeError("[01:02:03] /project/cpp/x.cc:1: out of patience"))
    good = compiler.start(StructuredOutputParams(choice=("7",)))
    allowed = compiler.bitmask({0: RequestGrammar(broken), 2: good})
    assert allowed.rows == [2] and set(allowed.failed) == {0}
    rows = [SamplingRow(SamplingParams(temperature=0.0), None, [1], []) for _ in range(3)]
    scores = torch.randn(3, compiler.vocab_size, generator=torch.Generator().manual_seed(1))
    results = sample(scores.clone(), rows, allowed)
    assert isinstance(results[0], SamplingFailure)
    assert results[0].reason == "the request's grammar could not be compiled: out of patience"
    assert results[1].token_id == int(scores[1].argmax())
    assert results[2].token_id == tokenizer.convert_tokens_to_ids("7")
