"""Adapters with trainable tokens and whole layer copies (PEFT's trainable_token_indices and modules_to_save) over
HTTP: pushed to the registry like any adapter, served with the offline engine's tokens when the server has
full-module slots, refused with the option to set when it has none."""

from __future__ import annotations

import pytest

from kvrun import LLM
from tests.models.families import PeftSpec, make_peft_adapter
from tests.serving.conftest import greedy, push

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def vocab_adapters(model_dir, tmp_path_factory) -> dict:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("vocab-adapters")
    # The prompt's own tokens and a spread of others (some among the top logits), within the default limit of 64
    prompt = AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]
    tokens = sorted(set(prompt) | set(range(100, 5000, 97)))[:60]
    specs = [
        PeftSpec("with-copy", 4, ["q_proj"], extra={"modules_to_save": ["lm_head"]}),
        PeftSpec("with-tokens", 4, ["v_proj"], extra={"trainable_token_indices": tokens}),
    ]
    return {spec.name: make_peft_adapter(model_dir, spec, root / spec.name, seed=index + 1)
            for index, spec in enumerate(specs)}  # fmt: skip


def _completion(http, model: str) -> tuple[int, dict]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    response = http.post("/v1/completions", json=body)
    return response.status_code, response.json()


def test_pushed_copies_and_tokens_are_served_as_the_engine_serves_them(serve, file_registry, model_dir,
                                                                      vocab_adapters):  # fmt: skip
    for name, directory in vocab_adapters.items():
        push(file_registry, directory, f"team/{name}")
    reference = LLM(str(model_dir), max_loras=2, max_lora_rank=16, num_blocks=256, block_size=4,
                    max_full_module_slots=1)  # fmt: skip
    for name, directory in vocab_adapters.items():
        reference.load_adapter(name, directory)
    names = list(vocab_adapters)
    expected = greedy(reference, [PROMPT] * (len(names) + 1), [*names, None], 6, ignore_eos=True)
    assert len({tuple(tokens) for tokens in expected}) == len(expected)  # each adapter changes the output
    server = serve(file_registry, max_full_module_slots=1)
    with server.client() as http:
        for name, tokens in zip(names, expected):
            status, body = _completion(http, f"team/{name}")
            assert status == 200, body
            assert body["choices"][0]["token_ids"] == tokens


def test_copies_on_a_server_without_full_module_slots_are_refused_by_name(serve, file_registry, vocab_adapters):
    push(file_registry, vocab_adapters["with-copy"], "team/with-copy")
    server = serve(file_registry)
    with server.client() as http:
        status, body = _completion(http, "team/with-copy")
        assert status == 422, body
        assert "--max-full-module-slots" in body["error"]["message"]
        status, body = _completion(http, "team/with-copy")  # and stays refused, the server still serving
        assert status == 422
        base = http.get("/v1/models").json()["data"][0]["id"]
        assert _completion(http, base)[0] == 200
        # listed with the reason, as an adapter of too high a rank is, and left out of /v1/models
        listed = {entry["id"]: entry for entry in http.get("/v1/adapters").json()["data"]}
        assert "--max-full-module-slots" in listed["team/with-copy"]["why_not_servable"]
        assert "team/with-copy" not in {card["id"] for card in http.get("/v1/models").json()["data"]}
