"""A consumer that fell behind gets the outputs waiting for it as one (OpenAI's routes and whole answers), never
TGI's token-per-event streams; a consumer that keeps up sees every output as the engine made it."""

from __future__ import annotations

import asyncio
import json
import time

from kvrun.engine.request import RequestOutput
from kvrun.serving.engine_client import RequestStream
from kvrun.serving.generation import TrackedStream, _per_choice, merge
from kvrun.serving.metrics import ServingMetrics

PROMPT = "Once upon a time"


class _Client:
    def _closed(self, request_id: str, finished: bool) -> None:
        pass


def _outputs(texts: list[str], last_reason: str = "length") -> list[RequestOutput]:
    outputs, text = [], ""
    for index, piece in enumerate(texts):
        text += piece
        last = index == len(texts) - 1
        reason = last_reason if last else None
        queue_time = 0.5 if index == 0 else None
        outputs.append(RequestOutput("r", [9], list(range(index + 1)), text, [index], piece, last, reason,
                                     queue_time=queue_time))  # fmt: skip
    return outputs


def _drain(items: list, coalesce: bool) -> list:
    async def run() -> list:
        stream = RequestStream(_Client(), "r")
        stream.coalesce = coalesce
        for item in items:
            stream.outputs.put_nowait(item)
        seen = []
        try:
            async for output in stream:
                seen.append(output)
        except RuntimeError as error:
            seen.append(error)
        return seen

    return asyncio.run(run())


def test_waiting_outputs_come_as_one_only_when_asked():
    outputs = _outputs(["a", "bc", "", "d"])
    assert _drain(outputs, coalesce=False) == outputs
    (merged,) = _drain(outputs, coalesce=True)
    assert merged.new_token_ids == [0, 1, 2, 3] and merged.new_text == "abcd" and merged.text == "abcd"
    assert merged.finished and merged.finish_reason == "length" and merged.token_ids == [0, 1, 2, 3]
    assert merged.queue_time == 0.5  # the first output's


def test_an_error_is_never_merged_into():
    outputs = _outputs(["a", "b", ""], last_reason="error")
    first, failed = _drain(outputs, coalesce=True)
    assert first.new_text == "ab" and not first.finished and failed is outputs[-1]
    error = RuntimeError("the engine stopped")
    first, raised = _drain([*_outputs(["a", "b", "c"])[:2], error], coalesce=True)
    assert first.new_text == "ab" and raised is error


def test_choices_are_merged_each_on_its_own_and_never_across_an_error():
    a, b = _outputs(["a", "b", "c"]), _outputs(["x", "y"])
    error = RuntimeError("the engine stopped")
    waiting = [(0, a[0]), (1, b[0]), (0, a[1]), (1, b[1]), (1, None), (0, error), (0, a[2])]
    (first, merged_a), (second, merged_b), end, failure, after = _per_choice(waiting)
    assert (first, merged_a.new_text, merged_a.finished) == (0, "ab", False)
    assert (second, merged_b.new_text, merged_b.finished) == (1, "xy", True)
    assert end == (1, None) and failure == (0, error) and after == (0, a[2])


def test_a_slow_reader_of_several_choices_gets_each_choice_merged():
    """The choices' outputs wait in merge's own queue when the reader (the SSE body) is slow, not the event loop."""

    async def run() -> list:
        requests = [RequestStream(_Client(), f"r{index}") for index in (0, 1)]
        streams = []
        for request in requests:
            request.coalesce = True
            streams.append(TrackedStream(request, ServingMetrics("m"), "completions", None, 1, time.monotonic()))
        reader = merge(streams)
        outputs = {0: _outputs(["a", "b", "c"]), 1: _outputs(["x", "y", "z"])}
        for index in (0, 1):
            requests[index].outputs.put_nowait(outputs[index][0])
        seen = [await reader.__anext__()]
        for position in (1, 2):
            for index in (0, 1):
                requests[index].outputs.put_nowait(outputs[index][position])
                for _ in range(5):
                    await asyncio.sleep(0)  # the pumps move each output on before the reader asks again
        seen += [item async for item in reader]
        return [(index, output.new_text, output.finished) for index, output in seen]

    assert asyncio.run(run()) == [(0, "a", False), (1, "x", False), (0, "bc", True), (1, "yz", True)]


def _stalled_stream(server, path: str, body: dict) -> list:
    """A streamed answer's events; after the third, the server's event loop stalls for a second while the engine
    core goes on stepping, so its outputs pile up for the stream."""
    loop = server.serving.client._loop
    events = []
    with server.client() as http:
        with http.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    data = line.removeprefix("data: ")
                    events.append(data if data == "[DONE]" else json.loads(data))
                    if len(events) == 3:
                        loop.call_soon_threadsafe(time.sleep, 1.0)
    return events


def test_a_stalled_openai_stream_catches_up_in_fewer_chunks_with_the_same_text(serve):
    server = serve(None, engine_process=True)
    model = server.serving.model_name
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 300, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    with server.client() as http:
        whole = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    events = _stalled_stream(server, "/v1/chat/completions", {**body, "stream": True})
    choices = [event["choices"][0] for event in events[:-1]]
    chunks = [choice for choice in choices if choice.get("token_ids")]
    assert "".join(choice["delta"].get("content") or "" for choice in choices) == whole["message"]["content"]
    assert [token for choice in chunks for token in choice["token_ids"]] == whole["token_ids"]
    assert len(chunks) < len(whole["token_ids"]), "no chunk carried more than one token"
    assert events[-1] == "[DONE]" and choices[-1]["finish_reason"] == "length"


def test_stalled_choices_of_one_call_catch_up_in_fewer_chunks_each(serve):
    server = serve(None, engine_process=True)
    body = {"model": server.serving.model_name, "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "n": 2,
            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    with server.client() as http:
        whole = http.post("/v1/completions", json=body).json()["choices"]
    events = _stalled_stream(server, "/v1/completions", {**body, "stream": True})
    for index in (0, 1):
        chunks = [event["choices"][0] for event in events[:-1] if event["choices"][0]["index"] == index]
        assert "".join(chunk["text"] for chunk in chunks) == whole[index]["text"]
        assert [token for chunk in chunks for token in chunk["token_ids"]] == whole[index]["token_ids"]
        assert len(chunks) < len(whole[index]["token_ids"]), "no chunk carried more than one token"


def test_a_stalled_tgi_stream_sends_the_events_of_one_that_kept_up(serve):
    server = serve(None, engine_process=True)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 300, "details": True}}
    with server.client() as http:
        with http.stream("POST", "/generate_stream", json=body) as response:
            kept_up = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert len(kept_up) == kept_up[-1]["details"]["generated_tokens"]  # one event per token
    assert _stalled_stream(server, "/generate_stream", body) == kept_up
