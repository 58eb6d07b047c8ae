"""Failure is per request: a row the engine finishes with an error ends that request alone, and only an engine
that can no longer step fails every request, stops, and says so on /health."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.serving.conftest import greedy

PROMPT = "Once upon a time"
POISON = "A poisoned prompt"
MAX_TOKENS = 12


async def _stream(http: httpx.AsyncClient, model: str, prompt: str) -> tuple[list[int], list[str]]:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}  # fmt: skip
    tokens, lines = [], []
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            lines.append(line)
            if line.startswith("data: {"):
                for choice in json.loads(line[6:]).get("choices", []):
                    tokens += choice.get("token_ids") or []
    return tokens, lines


def test_a_row_finished_with_an_error_ends_alone(serve, reference):
    server = serve(None, engine_process=False)  # the engine in this process, so the test can poison a step
    engine = server.serving.client.engine
    step = engine.step
    poison = engine.tokenize(POISON)

    def step_with_a_bad_row():
        outputs = step()
        for index, output in enumerate(outputs):
            if output.prompt_token_ids == poison and not output.finished and len(output.token_ids) >= 3:
                failed = engine.abort_request(output.request_id)  # frees its blocks, as the engine's own path does
                failed.finish_reason, failed.error = "error", "sampling failed: probabilities are NaN"
                outputs[index] = failed
        return outputs

    engine.step = step_with_a_bad_row
    base = server.serving.model_name

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            jobs = [_stream(http, base, POISON)] + [_stream(http, base, PROMPT) for _ in range(6)]
            return await asyncio.gather(*jobs)

    (bad_tokens, bad_lines), *others = asyncio.run(run())
    assert len(bad_tokens) < MAX_TOKENS and any("error" in line for line in bad_lines[-3:]), bad_lines
    expected = greedy(reference, [PROMPT], [None], MAX_TOKENS, ignore_eos=True)[0]
    for tokens, lines in others:
        assert tokens == expected and lines[-1] == "data: [DONE]"
    with server.client() as http:
        assert http.get("/health").status_code == 200
        again = http.post("/v1/completions", json={"model": base, "prompt": PROMPT, "max_tokens": 2})
        assert again.status_code == 200
        assert http.get("/metrics").status_code == 200


def test_an_engine_that_cannot_step_stops_and_says_so(serve):
    server = serve(None, engine_process=False)  # the engine in this process, so the test can break a step
    engine = server.serving.client.engine
    step = engine.step
    calls = {"count": 0}

    def failing_step():
        calls["count"] += 1
        if calls["count"] == 4:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return step()

    engine.step = failing_step
    base = server.serving.model_name

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            return await asyncio.gather(*[_stream(http, base, PROMPT) for _ in range(3)])

    for tokens, lines in asyncio.run(run()):
        assert len(tokens) < MAX_TOKENS and '"error"' in lines[-2] and lines[-1] == "data: [DONE]", lines
    assert_engine_stopped(server, "illegal memory access")


def assert_engine_stopped(server, reason: str) -> None:
    """/health and /ready answer 503 (health with the reason), and a new request gets 503 saying to restart."""
    with server.client() as http:
        health = http.get("/health")
        assert health.status_code == 503 and reason in health.json()["error"]
        assert http.get("/ready").status_code == 503
        body = {"model": server.serving.model_name, "prompt": PROMPT, "max_tokens": 2}
        refused = http.post("/v1/completions", json=body)
        assert refused.status_code == 503 and "restart" in refused.json()["error"]["message"]
