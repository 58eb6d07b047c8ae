"""A request the engine ends with finish_reason "error" gets an error event (OpenAI: an error object, then [DONE];
TGI: `{"error", "error_type": "generation"}`) or a 500 JSON error, while every other stream runs to its end.

The failing row is injected at the engine's output boundary: after a real step, outputs of requests whose prompt is
POISON are replaced by what the engine reports for a row it could not sample (the request aborted, finish_reason
"error", `error` = the reason), which is exactly what the HTTP layer consumes.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import openai
import pytest

from tests.serving.conftest import greedy

POISON = "This request fails in the sampler"
PROMPT = "The sea is"
REASON = "sampling produced NaN probabilities"


@pytest.fixture
def poisoned_server(serve):
    server = serve(None, engine_process=False)  # the engine in this process, so the test can poison a step
    engine = server.serving.client.engine
    poison_ids = server.serving.tokenizer.encode(POISON, add_special_tokens=True)
    step = engine.step

    def failing_step():
        outputs = step()
        for index, output in enumerate(outputs):
            if output.prompt_token_ids == poison_ids and not output.finished and output.token_ids:
                engine.abort_request(output.request_id)
                outputs[index] = replace(output, new_token_ids=[], new_text="", finished=True, finish_reason="error",
                                         error=REASON)  # fmt: skip
        return outputs

    engine.step = failing_step
    return server


def _sse(lines) -> list:
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_only_the_failing_stream_gets_an_error_event(poisoned_server, reference):
    base = poisoned_server.serving.model_name
    start = threading.Barrier(7)

    def stream(prompt: str) -> list:
        body = {"model": base, "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True,
                "ignore_eos": True, "return_token_ids": True}  # fmt: skip
        with poisoned_server.client() as http:
            start.wait()
            with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                return _sse(response.iter_lines())

    with ThreadPoolExecutor(7) as pool:
        futures = [pool.submit(stream, POISON if index == 3 else PROMPT) for index in range(7)]
        results = [future.result() for future in futures]
    failed = results.pop(3)
    assert failed[-1] == "[DONE]" and failed[-2]["error"]["type"] == "server_error"
    assert REASON in failed[-2]["error"]["message"] and failed[-2]["error"]["code"] == "generation_error"
    expected = greedy(reference, [PROMPT], [None], 12, ignore_eos=True)[0]
    for events in results:  # every other stream: all its tokens, unchanged, then [DONE]
        assert events[-1] == "[DONE]"
        assert [t for event in events[:-1] for t in event["choices"][0]["token_ids"]] == expected


def test_non_streaming_is_a_500_error_and_tgi_gets_a_generation_event(poisoned_server):
    base = poisoned_server.serving.model_name
    client = openai.OpenAI(base_url=f"{poisoned_server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as raised:
        client.completions.create(model=base, prompt=POISON, max_tokens=5)
    assert REASON in raised.value.message and raised.value.body["code"] == "generation_error"
    with poisoned_server.client() as http:
        answer = http.post("/generate", json={"inputs": POISON, "parameters": {"max_new_tokens": 5}})
        assert answer.status_code == 500 and answer.json()["error_type"] == "generation"
        with http.stream("POST", "/generate_stream", json={"inputs": POISON}) as response:
            events = _sse(response.iter_lines())
        assert events[-1] == {"error": f"Generation failed: {REASON}", "error_type": "generation"}
        assert http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}).status_code == 200
