"""TGI's `text-generation` and LoRAX's `lorax-client`, unmodified, against kvrun: generate and stream, base model and
adapters (registry refs, names loaded from a path, and `adapter_source="local"` directories), every field they send."""

from __future__ import annotations

import shutil

import lorax
import pytest
import text_generation
from text_generation.errors import ValidationError as TgiValidationError

from tests.serving.conftest import greedy

PROMPT = "def fibonacci(n):"
ADAPTERS = [None, "team/all-r8", "team/ko-r2:prod", "o-r16"]


def _expected(reference, adapter: str | None, tokens: int) -> list[int]:
    name = adapter.split(":")[0] if adapter else None  # the reference engine knows adapters by these names
    return greedy(reference, [PROMPT], [name], tokens, ignore_eos=True)[0]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_lorax_client_generate_and_stream(shared_server, reference, adapter):
    client = lorax.Client(shared_server.url, timeout=60)
    expected = _expected(reference, adapter, 6)
    response = client.generate(PROMPT, adapter_id=adapter, max_new_tokens=6, ignore_eos_token=True,
                               return_k_alternatives=3, decoder_input_details=True)  # fmt: skip
    details = response.details
    assert [token.id for token in details.tokens] == expected
    assert response.generated_text == reference.tokenizer.decode(expected, skip_special_tokens=True)
    assert details.prompt_tokens == len(reference.tokenizer.encode(PROMPT)) == len(details.prefill)
    assert [token.id for token in details.prefill] == reference.tokenizer.encode(PROMPT)
    for token in details.tokens:  # greedy: the chosen token is the best alternative, logprobs in order
        assert len(token.alternative_tokens) == 3 and token.alternative_tokens[0].id == token.id
        assert token.logprob == pytest.approx(token.alternative_tokens[0].logprob)
        logprobs = [alternative.logprob for alternative in token.alternative_tokens]
        assert logprobs == sorted(logprobs, reverse=True)
    events = list(client.generate_stream(PROMPT, adapter_id=adapter, max_new_tokens=6, ignore_eos_token=True))
    assert [event.token.id for event in events] == expected
    assert events[-1].details.generated_tokens == 6 and events[-1].details.finish_reason == "length"
    assert events[-1].generated_text == response.generated_text


@pytest.mark.parametrize("adapter", [None, "down-r4"])
def test_text_generation_client_generate_and_stream(shared_server, reference, adapter):
    """TGI's client has no adapter parameter; an adapter is reached by passing `adapter_id` in the body, which its
    `Parameters` model does not know, so the adapter case posts through LoRAX's client above; here: the base model
    through TGI's own client, and the adapter through the compat route with TGI's body shape."""
    client = text_generation.Client(shared_server.url, timeout=60)
    if adapter is None:
        expected = _expected(reference, None, 5)
        response = client.generate(PROMPT, max_new_tokens=5, top_n_tokens=2, decoder_input_details=True)
        assert response.generated_text == reference.tokenizer.decode(expected[: response.details.generated_tokens],
                                                                     skip_special_tokens=True)  # fmt: skip
        assert [token.id for token in response.details.tokens] == expected[: len(response.details.tokens)]
        assert all(len(top) == 2 for top in response.details.top_tokens)
        assert len(response.details.prefill) == len(reference.tokenizer.encode(PROMPT))
        events = list(client.generate_stream(PROMPT, max_new_tokens=5, top_n_tokens=2))
        assert [event.token.id for event in events] == [token.id for token in response.details.tokens]
        assert events[-1].details.finish_reason in ("length", "eos_token") and len(events[-1].top_tokens) == 2
        return
    expected = _expected(reference, adapter, 5)
    request = text_generation.types.Request(inputs=PROMPT, parameters=text_generation.types.Parameters(
        max_new_tokens=5, details=True, repetition_penalty=None, decoder_input_details=False))  # fmt: skip
    body = request.model_dump()
    body["parameters"]["adapter_id"] = adapter  # TGI >= 2.1 servers read it; the 0.7 client has no argument
    with shared_server.client() as http:
        answer = http.post("/", json=body)
    assert answer.status_code == 200, answer.text
    generated = text_generation.types.Response(**answer.json()[0])
    assert [token.id for token in generated.details.tokens] == expected[: len(generated.details.tokens)]


def test_greedy_temperature_zero_and_sampling_seed(shared_server):
    client = lorax.Client(shared_server.url, timeout=60)
    first = client.generate(PROMPT, adapter_id="team/attn-r4", do_sample=True, max_new_tokens=6, seed=7)
    again = client.generate(PROMPT, adapter_id="team/attn-r4", do_sample=True, max_new_tokens=6, seed=7)
    assert first.details.seed == 7 and first.generated_text == again.generated_text


def test_local_adapter_source_loads_the_directory_once(shared_server, reference, adapter_dirs, tmp_path):
    client = lorax.Client(shared_server.url, timeout=60)
    directory = tmp_path / "pirate"
    shutil.copytree(adapter_dirs["up-r2"], directory)
    expected = greedy(reference, [PROMPT], ["up-r2"], 4, ignore_eos=True)[0]
    for adapter_id in (str(directory), str(directory), str(adapter_dirs["up-r2"])):
        response = client.generate(PROMPT, adapter_id=adapter_id, adapter_source="local", max_new_tokens=4,
                                   ignore_eos_token=True)  # fmt: skip
        assert [token.id for token in response.details.tokens] == expected
    local = {path: name for name, path in shared_server.serving.resolver.local.items()}
    assert local[str(directory)].startswith("local:pirate-")
    assert local[str(adapter_dirs["up-r2"])] == "up-r2"  # already loaded by /v1/load_lora_adapter: reused
    with pytest.raises(lorax.errors.ValidationError) as raised:
        client.generate(PROMPT, adapter_id="/no/such/adapter", adapter_source="local")
    assert "adapter_id" in str(raised.value)


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"adapter_id": "org/repo", "adapter_source": "hub"}, "adapter_source"),
        ({"adapter_id": "s3://bucket/a", "adapter_source": "s3"}, "adapter_source"),
        ({"best_of": 2, "do_sample": True}, "best_of"),
        ({"typical_p": 0.5}, "typical_p"),
        ({"watermark": True}, "watermark"),
        ({"max_new_tokens": "5"}, "max_new_tokens"),
        ({"return_k_alternatives": 50}, "return_k_alternatives"),
    ],
)
def test_refused_fields_are_named(shared_server, parameters, field):
    with shared_server.client() as http:
        for route in ("/", "/generate", "/generate_stream"):
            response = http.post(route, json={"inputs": PROMPT, "parameters": parameters})
            assert response.status_code == 400, response.text
            body = response.json()
            assert body["error_type"] == "validation" and f"parameters.{field}" in body["error"]


def test_lorax_client_errors_are_its_exceptions(shared_server):
    client = lorax.Client(shared_server.url, timeout=60)
    with pytest.raises(lorax.errors.ValidationError, match="adapter_source"):
        client.generate(PROMPT, adapter_id="org/repo", adapter_source="hub")
    with pytest.raises(lorax.errors.NotFoundError):
        client.generate(PROMPT, adapter_id="team/never-pushed")
    tgi = text_generation.Client(shared_server.url, timeout=60)
    with pytest.raises(TgiValidationError, match="typical_p"):
        tgi.generate(PROMPT, typical_p=0.5)


def test_info_is_tgi_shaped(shared_server):
    with shared_server.client() as http:
        info = http.get("/info").json()
    serving = shared_server.serving
    assert info["model_id"] == serving.model_name and info["router"] == "kvrun"
    assert info["max_total_tokens"] == serving.service.context_limit
    assert info["max_input_tokens"] == info["max_input_length"] == info["max_total_tokens"] - 1
    assert info["max_concurrent_requests"] == serving.client.max_active and info["max_best_of"] == 1
    assert info["max_lora_rank"] == 16 and info["model_device_type"] == "cpu"
    assert isinstance(info["version"], str) and info["max_stop_sequences"] == 16
