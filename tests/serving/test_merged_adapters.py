"""LoRAX's `merged_adapters` on /generate, /generate_stream and POST /: the official lorax-client gets the tokens of
the same merge computed by the offline engine (whose merges equal PEFT's: tests/adapters/test_merge.py), merges are
cached by content and follow re-pushes, and what cannot be merged is refused naming the field."""

from __future__ import annotations

import lorax
import pytest

from tests.serving.conftest import greedy, push

PROMPT = "def fibonacci(n):"
TOKENS = 5


def _expected(reference, name: str, ids: list[str], weights: list[float], strategy: str = "linear",
              density: float = 1.0, sign: str = "total") -> list[int]:  # fmt: skip
    """Greedy tokens of the merge made by the offline engine (its adapters carry the shared server's names)."""
    if name not in reference.engine.adapters.names():
        reference.merge_adapters(name, ids, weights, strategy, density, sign)
    return greedy(reference, [PROMPT], [name], TOKENS, ignore_eos=True)[0]


@pytest.mark.parametrize(
    ("ids", "weights", "strategy", "density", "sign"),
    [
        (["team/all-r8", "qkv-r8"], [0.6, -0.8], "linear", 1.0, None),  # a registry ref and a path-loaded adapter
        (["team/all-r8", "qkv-r8"], [1.0, 0.7], "ties", 0.5, "frequency"),
        (["team/all-r8:prod", "qkv-r8"], [1.2, 0.5], "dare_ties", 0.6, "total"),
        (["team/mlp-r16", "o-r16"], [0.5, 1.3], "dare_linear", 0.8, None),  # no module in common
    ],
)
def test_lorax_client_merged_adapters(shared_server, reference, ids, weights, strategy, density, sign):
    client = lorax.Client(shared_server.url, timeout=60)
    merged = lorax.MergedAdapters(ids=ids, weights=weights, merge_strategy=strategy, density=density,
                                  majority_sign_method=sign)  # fmt: skip
    reference_ids = [adapter.split(":")[0] for adapter in ids]
    expected = _expected(reference, f"{strategy}-{'-'.join(reference_ids)}", reference_ids, weights, strategy,
                         density, sign or "total")  # fmt: skip
    plain = greedy(reference, [PROMPT], [reference_ids[0]], TOKENS, ignore_eos=True)[0]
    assert expected != plain  # the merge changes what the model says
    response = client.generate(PROMPT, merged_adapters=merged, max_new_tokens=TOKENS, ignore_eos_token=True)
    assert [token.id for token in response.details.tokens] == expected
    events = list(client.generate_stream(PROMPT, merged_adapters=merged, max_new_tokens=TOKENS,
                                         ignore_eos_token=True))  # fmt: skip
    assert [event.token.id for event in events] == expected
    with shared_server.client() as http:  # TGI's compat route; the merge is served from the engine now
        body = {"inputs": PROMPT, "parameters": {"merged_adapters": merged.model_dump(), "max_new_tokens": TOKENS,
                                                 "ignore_eos_token": True, "details": True}}  # fmt: skip
        answer = http.post("/", json=body)
        adapters = http.get("/v1/adapters").json()["data"]
    assert answer.status_code == 200, answer.text
    assert [token["id"] for token in answer.json()[0]["details"]["tokens"]] == expected
    identity = answer.headers["x-kvrun-adapter-sha256"]
    assert answer.headers["x-kvrun-adapter"] == f"merged:sha256:{identity}"
    [entry] = [entry for entry in adapters if entry["id"] == f"merged:sha256:{identity}"]
    assert entry["source"] == "merged"


MERGE = {"ids": ["team/all-r8", "qkv-r8"], "weights": [0.5, 0.5]}
BASE = object()  # stands for the base model's name


@pytest.mark.parametrize(
    ("merged", "status", "field"),
    [
        ({"ids": [], "weights": []}, 400, "merged_adapters.ids"),
        ({**MERGE, "weights": [1.0]}, 400, "merged_adapters.weights"),
        ({**MERGE, "density": -0.5}, 400, "merged_adapters.density"),
        ({**MERGE, "merge_strategy": "ties", "density": 0.0}, 400, "merged_adapters.density"),
        ({**MERGE, "merge_strategy": "slerp"}, 400, "merged_adapters.merge_strategy"),
        ({**MERGE, "majority_sign_method": "mean"}, 400, "merged_adapters.majority_sign_method"),
        ({**MERGE, "densty": 0.5}, 400, "merged_adapters"),  # a typo would silently merge differently
        ({**MERGE, "ids": ["team/all-r8", "team/never-pushed"]}, 404, None),
        ({**MERGE, "ids": ["team/all-r8", BASE]}, 400, "merged_adapters.ids"),
        ({**MERGE, "ids": ["team/all-r8", "team/attn-r4"], "merge_strategy": "ties", "density": 0.5}, 400,
         "merged_adapters.ids"),  # ranks differ: ties merges factor by factor
        ({"ids": ["team/all-r8", "qkv-r8", "team/attn-r4"], "weights": [1, 1, 1]}, 400,
         "merged_adapters.ids"),  # linear adds ranks: 8 + 8 + 4 at q_proj, over --max-lora-rank 16
    ],
)
def test_what_cannot_be_merged_is_refused_naming_the_field(shared_server, merged, status, field):
    merged = {**merged, "ids": [shared_server.serving.model_name if i is BASE else i for i in merged["ids"]]}
    with shared_server.client() as http:
        for route in ("/", "/generate", "/generate_stream"):
            response = http.post(route, json={"inputs": PROMPT, "parameters": {"merged_adapters": merged}})
            assert response.status_code == status, response.text
            if field is not None:
                assert f"parameters.{field}" in response.json()["error"], response.text


def test_adapter_id_and_merged_adapters_together_are_refused(shared_server):
    with shared_server.client() as http:
        body = {"inputs": PROMPT, "parameters": {"adapter_id": "team/all-r8", "merged_adapters": MERGE}}
        response = http.post("/generate", json=body)
    assert response.status_code == 400 and "parameters.merged_adapters" in response.json()["error"]


def test_a_repushed_component_gives_the_merge_a_new_identity(serve, file_registry, adapter_dirs, reference):
    push(file_registry, adapter_dirs["all-r8"], "team/mix-part")
    push(file_registry, adapter_dirs["qkv-r8"], "team/other")
    server = serve(file_registry, engine_process=False, resolve_ttl_s=0.0)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": TOKENS, "ignore_eos_token": True, "details": True,
                                             "merged_adapters": {"ids": ["team/mix-part", "team/other"],
                                                                 "weights": [0.8, 0.8]}}}  # fmt: skip

    def generate() -> tuple[str, list[int]]:
        with server.client() as http:
            response = http.post("/generate", json=body)
        assert response.status_code == 200, response.text
        return response.headers["x-kvrun-adapter-sha256"], [t["id"] for t in response.json()["details"]["tokens"]]

    first, tokens = generate()
    assert generate() == (first, tokens)  # the same merge: cached, same identity
    assert tokens == _expected(reference, "repush-before", ["team/all-r8", "qkv-r8"], [0.8, 0.8])
    push(file_registry, adapter_dirs["down-r4"], "team/mix-part")  # version 2: other weights under the same name
    second, tokens = generate()
    assert second != first
    assert tokens == _expected(reference, "repush-after", ["down-r4", "qkv-r8"], [0.8, 0.8])


def test_openai_extension_field(shared_server, reference):
    """/v1/completions and /v1/chat/completions take the same object in `merged_adapters` (model: the base)."""
    merged = {"ids": ["team/all-r8", "qkv-r8"], "weights": [0.6, -0.8]}
    expected = _expected(reference, "linear-team/all-r8-qkv-r8", ["team/all-r8", "qkv-r8"], [0.6, -0.8])
    base = shared_server.serving.model_name
    body = {"model": base, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "merged_adapters": merged}  # fmt: skip
    with shared_server.client() as http:
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["token_ids"] == expected
        assert response.headers["x-kvrun-adapter"].startswith("merged:sha256:")
        chat = http.post("/v1/chat/completions", json={"model": base, "max_tokens": 2, "merged_adapters": merged,
                                                       "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
        assert chat.status_code == 200, chat.text
        wrong = http.post("/v1/completions", json={**body, "model": "team/all-r8"})
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "model"
        bad = http.post("/v1/completions", json={**body, "merged_adapters": {**merged, "weights": [1.0]}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "merged_adapters.weights"
