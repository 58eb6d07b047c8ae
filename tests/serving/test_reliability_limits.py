"""Requests that can never fit are refused with 400 naming the limit, and the queue timeout bounds only the time a
request waits to be scheduled, never its work (a long prefill is not 'no token within the timeout')."""

from __future__ import annotations

import time

import httpx

PROMPT = "Hello there"


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_a_call_larger_than_the_in_flight_limit_is_400_naming_it(serve):
    server = serve(None, max_num_seqs=2, max_queue=1)  # at most 3 requests in flight
    base = server.serving.model_name
    with server.client() as http:
        completion = {"model": base, "prompt": PROMPT, "max_tokens": 2}
        for body in ({**completion, "n": 4}, {**completion, "prompt": [PROMPT, PROMPT], "n": 2}):
            response = http.post("/v1/completions", json=body)
            error = _error(response, 400)
            assert error["param"] == "n" and "3" in error["message"] and "retry-after" not in response.headers
        chat = {"model": base, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2, "n": 4}
        assert _error(http.post("/v1/chat/completions", json=chat), 400)["param"] == "n"
        for body in ({**completion, "n": 3}, {**chat, "n": 3}):  # at the limit: served
            route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            response = http.post(route, json=body)
            assert response.status_code == 200 and len(response.json()["choices"]) == 3, response.text


def test_queue_timeout_counts_waiting_not_work(serve):
    """Each prefill step takes longer than the queue timeout: requests that are scheduled at once still finish."""
    server = serve(None, queue_timeout_s=0.5, max_num_seqs=4, engine_process=False)  # to slow the engine's steps
    engine = server.serving.client.engine
    execute = engine.runner.execute

    def slow_prefill(batch, previous=None):
        if batch.is_prefill:
            time.sleep(1.0)  # a long prompt's prefill on a busy CPU
        return execute(batch, previous)

    engine.runner.execute = slow_prefill
    base = server.serving.model_name
    with server.client() as http:
        response = http.post("/v1/completions", json={"model": base, "prompt": PROMPT, "max_tokens": 3})
        assert response.status_code == 200, response.text
        stream = {"model": base, "prompt": PROMPT, "max_tokens": 3, "stream": True}
        with http.stream("POST", "/v1/completions", json=stream) as events:
            lines = [line for line in events.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines), lines
