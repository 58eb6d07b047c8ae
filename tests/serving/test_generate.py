"""TGI / LoRAX endpoints through httpx: /generate and /generate_stream with `parameters.adapter_id`."""

from __future__ import annotations

import json

import pytest

from tests.serving.conftest import greedy

INPUTS = "def fibonacci(n):"


def _events(raw: str) -> list[dict]:
    return [json.loads(event.removeprefix("data: ")) for event in raw.split("\n\n") if event.startswith("data: ")]


@pytest.mark.parametrize("adapter", [None, "team/mlp-r16:prod", "o-r16"])
def test_generate_details_match_offline(shared_server, reference, adapter):
    name = adapter.split(":")[0] if adapter else None
    expected = greedy(reference, [INPUTS], [name], 7, ignore_eos=True)[0]
    body = {"inputs": INPUTS, "parameters": {"adapter_id": adapter, "max_new_tokens": 7, "details": True}}
    with shared_server.client() as http:
        response = http.post("/generate", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    details = result["details"]
    if details["finish_reason"] == "eos_token":
        expected = expected[: details["generated_tokens"]]
    assert [token["id"] for token in details["tokens"]] == expected
    assert details["generated_tokens"] == len(expected) and details["seed"] is None
    assert result["generated_text"] == reference.tokenizer.decode(expected, skip_special_tokens=True)
    assert all(token["logprob"] <= 0 for token in details["tokens"])


def test_generate_stream_events(shared_server, reference):
    expected = greedy(reference, [INPUTS], ["team/ko-r2"], 5, ignore_eos=True)[0]
    body = {"inputs": INPUTS, "parameters": {"adapter_id": "team/ko-r2", "max_new_tokens": 5, "details": True,
                                              "top_n_tokens": 2}}  # fmt: skip
    with shared_server.client() as http:
        response = http.post("/generate_stream", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    assert [event["token"]["id"] for event in events][: len(expected)] == expected[: len(events)]
    assert all(event["generated_text"] is None and event["details"] is None for event in events[:-1])
    last = events[-1]
    assert last["generated_text"] == "".join(event["token"]["text"] for event in events)
    assert last["details"]["generated_tokens"] == len(events)
    assert last["details"]["input_length"] == len(reference.tokenizer.encode(INPUTS))
    assert all(len(event["top_tokens"]) == 2 for event in events)


def test_sampling_reports_and_honours_the_seed(shared_server):
    body = {"inputs": INPUTS, "parameters": {"adapter_id": "down-r4", "max_new_tokens": 6, "do_sample": True,
                                              "details": True, "top_k": 50}}  # fmt: skip
    with shared_server.client() as http:
        first = http.post("/generate", json=body).json()
        seed = first["details"]["seed"]
        assert isinstance(seed, int)
        body["parameters"]["seed"] = seed
        again = http.post("/generate", json=body).json()
    assert again["generated_text"] == first["generated_text"] and again["details"]["seed"] == seed


def test_stop_sequence_and_full_text(shared_server):
    with shared_server.client() as http:
        text = http.post("/generate", json={"inputs": INPUTS, "parameters": {"max_new_tokens": 10}}).json()
        generated = text["generated_text"]
        stop = generated[3:6]
        if not stop.strip():
            pytest.skip("no usable stop sequence in this output")
        body = {"inputs": INPUTS, "parameters": {"max_new_tokens": 10, "stop": [stop], "details": True,
                                                  "return_full_text": True}}  # fmt: skip
        result = http.post("/generate", json=body).json()
    assert result["details"]["finish_reason"] == "stop_sequence"
    assert result["generated_text"] == INPUTS + generated[: generated.index(stop)]


def test_generate_with_stream_flag_streams(shared_server):
    body = {"inputs": INPUTS, "parameters": {"max_new_tokens": 3}, "stream": True}
    with shared_server.client() as http:
        response = http.post("/generate", json=body)
    events = _events(response.text)
    assert len(events) == 3 and events[-1]["generated_text"] is not None
