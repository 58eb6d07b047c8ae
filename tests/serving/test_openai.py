"""The OpenAI endpoints through the official `openai` client (and raw httpx where the wire format itself is tested)."""

from __future__ import annotations

import json

import openai
import pytest

from kvrun.engine.tokenizer import apply_chat_template
from tests.serving.conftest import greedy

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def client(shared_server):
    return openai.OpenAI(base_url=f"{shared_server.url}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("model", [None, "team/all-r8", "team/all-r8:prod", "team/all-r8@1", "qkv-r8"])
def test_completion_tokens_match_offline(client, shared_server, reference, model):
    expected = greedy(reference, [PROMPT], [model.split(":")[0].split("@")[0] if model else None], 10)[0]
    response = client.completions.create(
        model=model or shared_server.serving.model_name, prompt=PROMPT, max_tokens=10, temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": False},
    )  # fmt: skip
    choice = response.choices[0]
    assert choice.token_ids == expected
    assert choice.text == reference.tokenizer.decode(expected, skip_special_tokens=True)
    assert response.usage.completion_tokens == len(expected)
    assert response.usage.prompt_tokens == len(reference.tokenizer.encode(PROMPT))
    assert response.object == "text_completion" and response.id.startswith("cmpl-")


def test_adapters_change_the_output(client, reference):
    """Sanity for every other comparison: each adapter's greedy tokens differ from the base model's."""
    names = [None, "team/attn-r4", "team/all-r8", "team/mlp-r16", "team/ko-r2", "qkv-r8", "down-r4", "o-r16", "up-r2"]
    outputs = greedy(reference, [PROMPT] * len(names), names, 8)
    assert all(output != outputs[0] for output in outputs[1:])


def test_completion_stream_matches_offline_with_usage(client, reference):
    expected = greedy(reference, [PROMPT], ["team/mlp-r16"], 12)[0]
    stream = client.completions.create(
        model="team/mlp-r16", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"return_token_ids": True},
    )  # fmt: skip
    chunks = list(stream)
    tokens = [token for chunk in chunks if chunk.choices for token in chunk.choices[0].token_ids]
    assert tokens == expected
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text == reference.tokenizer.decode(expected, skip_special_tokens=True)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected)
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert [chunk.choices[0].finish_reason for chunk in chunks[:-1]][-1] == "length"


def test_chat_non_streaming_matches_offline(client, reference):
    prompt = apply_chat_template(reference.tokenizer, MESSAGES)
    expected = greedy(reference, [prompt], ["o-r16"], 9)[0]
    response = client.chat.completions.create(model="o-r16", messages=MESSAGES, max_tokens=9, temperature=0)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == reference.tokenizer.decode(expected, skip_special_tokens=True)
    assert response.choices[0].finish_reason in ("length", "stop")
    assert response.usage.completion_tokens == len(expected)
    assert response.object == "chat.completion"


def test_chat_stream_is_exactly_openai_sse(shared_server, reference):
    prompt = apply_chat_template(reference.tokenizer, MESSAGES)
    expected = greedy(reference, [prompt], ["team/ko-r2"], 6, ignore_eos=True)[0]
    body = {"model": "team/ko-r2", "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with shared_server.client() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(event.startswith("data: ") and "\n" not in event for event in events)
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    for chunk in chunks:
        assert set(chunk) >= {"id", "object", "created", "model", "choices", "usage"}
        assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == "team/ko-r2"
        assert chunk["id"] == chunks[0]["id"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"])
    assert content == reference.tokenizer.decode(expected, skip_special_tokens=True)
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_stream_without_include_usage_has_no_usage_field(shared_server):
    body = {"model": "team/ko-r2", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    with shared_server.client() as http:
        raw = http.post("/v1/completions", json=body).text
    chunks = [json.loads(event[6:]) for event in raw.split("\n\n") if event.startswith("data: {")]
    assert chunks and all("usage" not in chunk for chunk in chunks)
    assert raw.endswith("data: [DONE]\n\n")


def test_n_choices_logprobs_and_batch_prompts(client, reference):
    response = client.completions.create(
        model="down-r4", prompt=[PROMPT, "Once upon a time"], max_tokens=4, temperature=0, n=2, logprobs=3,
    )  # fmt: skip
    assert [choice.index for choice in response.choices] == [0, 1, 2, 3]
    expected = greedy(reference, [PROMPT, "Once upon a time"], ["down-r4"] * 2, 4)
    texts = [reference.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in expected]
    assert [choice.text for choice in response.choices] == [texts[0], texts[0], texts[1], texts[1]]
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == 4 and len(logprobs.top_logprobs[0]) == 3
    assert logprobs.token_logprobs[0] == pytest.approx(max(logprobs.top_logprobs[0].values()))


def test_chat_logprobs(client):
    response = client.chat.completions.create(
        model="up-r2", messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    assert all(len(item.top_logprobs) == 2 and item.logprob <= 0 for item in content)


def test_stop_string_ends_the_text(client, reference):
    full = client.completions.create(model="team/all-r8", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    if not stop.strip():
        pytest.skip("no usable stop string in this output")
    choice = client.completions.create(
        model="team/all-r8", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop]
    ).choices[0]
    assert choice.finish_reason == "stop" and choice.text == full[: full.index(stop)]


def test_seeded_sampling_repeats(client):
    kwargs = dict(model="team/attn-r4", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=1234)
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first


def test_models_list_base_and_adapters_like_vllm(client, shared_server):
    models = {model.id: model for model in client.models.list().data}
    base = shared_server.serving.model_name
    assert models[base].parent is None and models[base].owned_by == "kvrun"
    assert models["team/all-r8"].root == "team/all-r8@1" and models["team/all-r8"].parent == base
    assert models["team/all-r8:prod"].root == "team/all-r8@1"
    assert models["qkv-r8"].parent == base and models["qkv-r8"].root.endswith("qkv-r8")


def test_openapi_schema_is_served(shared_server):
    with shared_server.client() as http:
        schema = http.get("/schema/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/generate", "/v1/adapters"} <= set(schema["paths"])
