"""Behind `kvrun serve` the engine core sends token ids and the server makes the text (process_client._Stream):
every output must carry the same text, deltas, finish and stop reasons as an engine that detokenizes itself —
multi-byte characters split over tokens, stop strings spanning tokens, special tokens kept or skipped, aborts."""

from __future__ import annotations

import json

import pytest

from kvrun import LLM, SamplingParams
from kvrun.engine.core import EngineRequest
from kvrun.engine.core_process import FrameBuffer, FromCore, Outputs, delta_of, encode
from kvrun.serving.process_client import _Stream
from kvrun.structured.spec import StructuredOutputParams
from tests.serving.test_disconnect import _metrics

# Their tokens are mostly pieces of characters (the emoji and the CJK take several byte tokens each).
PIECES = "héllo wörld 😀 日本語 ✓"
WORDS = StructuredOutputParams(regex="(héllo|wörld|😀|日本語|✓| ){16}")  # whole characters, of any tokenization
PROMPT = "Once upon a time"
STOPS = ((), ("ö",), ("😀",), ("llo w", "本"), ("ld 😀",))
ABORT_AFTER_STEPS = 6


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), max_loras=0, num_blocks=512, block_size=4)


def _params(tokenizer) -> list[SamplingParams]:
    """Random walks over character pieces and special tokens (a +100 bias makes them the only likely tokens), and
    random sentences of whole characters that the tokens split (a grammar allows only those)."""
    pieces = set(tokenizer.encode(PIECES, add_special_tokens=False)) | set(tokenizer.all_special_ids)
    bias = {token: 100.0 for token in sorted(pieces)}
    rows = []
    for seed in range(4):
        for stop in STOPS:
            for skip in (True, False):
                rows.append(SamplingParams(
                    max_tokens=20, temperature=1.0, seed=seed, logit_bias=bias, stop=stop, skip_special_tokens=skip,
                    ignore_eos=seed % 2 == 0, stop_token_ids=(1,) if seed == 2 else (), logprobs=1 if seed else None,
                ))  # fmt: skip
            rows.append(SamplingParams(max_tokens=40, temperature=1.0, seed=seed, stop=stop, structured_output=WORDS))
    return rows


def _run(llm, rows: list[SamplingParams], detokenize: bool) -> list[list]:
    """Each request's outputs in order; a few steps in, every 4th request still running is aborted."""
    engine = llm.engine
    engine.detokenize = detokenize
    try:
        requests = [engine.add_request(PROMPT, params) for params in rows]
        outputs = {request.request_id: [] for request in requests}
        steps = 0
        while engine.has_unfinished():
            for output in engine.step():
                outputs[output.request_id].append(output)
            steps += 1
            if steps == ABORT_AFTER_STEPS:
                for request in requests[1::4]:
                    output = engine.abort_request(request.request_id)
                    if output is not None:
                        outputs[request.request_id].append(output)
    finally:
        engine.detokenize = True
    return [outputs[request.request_id] for request in requests]


def _through_the_server(outputs: list, params: SamplingParams, tokenizer) -> list:
    """The core's outputs as messages (encoded and decoded), turned back into outputs the way the server does."""
    stream = _Stream(None, EngineRequest("r", [1], params), tokenizer)
    frames = FrameBuffer(FromCore)
    (message,) = frames.feed(encode(Outputs([delta_of(output) for output in outputs])))
    return [stream.output(delta) for delta in message.deltas]


def _visible(output) -> tuple:
    return (output.text, output.new_text, output.new_token_ids, output.token_ids, output.finished,
            output.finish_reason, output.stop_reason, output.logprobs, output.error)  # fmt: skip


def test_the_server_makes_the_text_an_engine_that_detokenizes_makes(llm):
    tokenizer = llm.tokenizer
    rows = _params(tokenizer)
    expected = _run(llm, rows, detokenize=True)
    from_core = _run(llm, rows, detokenize=False)
    for params, want, sent in zip(rows, expected, from_core):
        assert [output.token_ids for output in sent] == [output.token_ids for output in want]
        assert all(output.text == "" and output.new_text == "" for output in sent)  # no text in the core's outputs
        assert [_visible(output) for output in _through_the_server(sent, params, tokenizer)] == [
            _visible(output) for output in want
        ], params
    finals = [outputs[-1] for outputs in expected]
    # The cases this test is about did occur:
    assert sum(final.finish_reason == "abort" for final in finals) >= 4
    stopped = [final for final in finals if isinstance(final.stop_reason, str)]
    assert any(len(tokenizer.encode(final.stop_reason, add_special_tokens=False)) > 1 for final in stopped)
    assert any(final.stop_reason == 1 for final in finals)
    held = [output for outputs in expected for output in outputs if not output.finished and output.new_token_ids
            and not output.new_text]  # fmt: skip
    assert held, "no step held back text (a partial character or a possible stop string)"
    assert any("<|im_start|>" in final.text for final in finals)
    assert any(char in final.text for final in finals for char in "😀日語")


def test_a_text_that_cannot_be_made_ends_its_request_alone(llm):
    tokenizer = llm.tokenizer
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, stop=("zzz",))
    (outputs,) = _run(llm, [params], detokenize=False)
    stream = _Stream(None, EngineRequest("r", [1], params), tokenizer)
    made = [stream.output(delta_of(output)) for output in outputs[:3]]

    class Broken:
        def step(self, token_ids):
            raise RuntimeError("detokenizer exploded")

    stream.detokenizer = Broken()
    failed = stream.output(delta_of(outputs[3]))
    assert failed.finished and failed.finish_reason == "error" and "detokenizer exploded" in failed.error
    assert failed.token_ids == outputs[2].token_ids and failed.new_token_ids == []
    whole = tokenizer.decode(outputs[2].token_ids)
    assert made[-1].text + failed.new_text == failed.text == whole  # the held-back tail comes out at the end


def test_a_stream_whose_text_fails_on_the_server_gets_an_error_and_stops_in_the_core(serve):
    server = serve(None, engine_process=True)
    client = server.serving.client
    tokenizer = client.tokenizer

    class BreaksAtThirdToken:
        def decode(self, token_ids, **options):
            if len(token_ids) >= 3:
                raise RuntimeError("detokenizer exploded")
            return tokenizer.decode(token_ids, **options)

    client.tokenizer = BreaksAtThirdToken()
    body = {"model": server.serving.model_name, "prompt": PROMPT, "max_tokens": 1800, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with server.client() as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "detokenizer exploded" in json.loads(events[-2])["error"]["message"]
        # The server wrote the abort before the error reached the stream; the core reads messages in order.
        metrics = _metrics(http)
        assert metrics["kvrun_requests_running"] == 0
        assert metrics["kvrun_kv_blocks_free"] == metrics["kvrun_kv_blocks_total"]
