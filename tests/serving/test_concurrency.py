"""64 concurrent streams over eight adapters (four slots) and the base model return exactly the offline tokens."""

from __future__ import annotations

import asyncio

import httpx
import openai

from tests.serving.conftest import greedy, model_names

NUM_STREAMS = 64
MAX_TOKENS = 12
PROMPTS = ["The sea is", "def add(a, b):", "Once upon a time", "In 1492,", "Dear diary,", "The mitochondria"]


async def _stream(client: openai.AsyncOpenAI, model: str, prompt: str, chat: bool) -> list[int]:
    extra = {"return_token_ids": True, "ignore_eos": True}
    if chat:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0,
            stream=True, extra_body=extra,
        )  # fmt: skip
    else:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True, extra_body=extra
        )
    tokens: list[int] = []
    async for chunk in stream:
        for choice in chunk.choices:
            tokens += getattr(choice, "token_ids", None) or []
    return tokens


def test_64_concurrent_streams_match_offline(shared_server, reference):
    names = model_names()
    base = shared_server.serving.model_name
    jobs = [(names[index % len(names)], PROMPTS[index % len(PROMPTS)], index % 4 == 3) for index in range(NUM_STREAMS)]

    async def run() -> list[list[int]]:
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=NUM_STREAMS), timeout=120)
        client = openai.AsyncOpenAI(base_url=f"{shared_server.url}/v1", api_key="x", max_retries=0, http_client=http)
        async with http:
            return await asyncio.gather(*(_stream(client, name or base, prompt, chat) for name, prompt, chat in jobs))

    results = asyncio.run(run())
    tokenizer = reference.tokenizer
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        if chat else prompt
        for _, prompt, chat in jobs
    ]  # fmt: skip
    expected = greedy(reference, prompts, [name for name, _, _ in jobs], MAX_TOKENS, ignore_eos=True)
    mismatched = [index for index, (got, want) in enumerate(zip(results, expected)) if got != want]
    assert not mismatched, f"{len(mismatched)} of {NUM_STREAMS} streams differ, e.g. {jobs[mismatched[0]]}"
    with shared_server.client() as http:
        adapters = http.get("/v1/adapters").json()["data"]
    assert all(entry["pinned"] == 0 and entry["in_flight"] == 0 for entry in adapters)
    assert sum(entry["state"] == "gpu" for entry in adapters) <= 4
