"""Fixtures for the registry suite: one `store` per test, parametrized over the file and Redis backends.

Redis is the real server at env KVRUN_TEST_REDIS (default redis://127.0.0.1:6379/0); each test gets its own
random key prefix and deletes its keys afterwards. If Redis does not answer, the Redis half skips.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch
from safetensors.torch import save_file

from adapters_registry import AdapterStore, open_store

REDIS_URL = os.environ.get("KVRUN_TEST_REDIS", "redis://127.0.0.1:6379/0")
TEST_CHUNK_SIZE = 1024  # tiny chunks, so tiny adapters still span several of them


def _redis_unavailable_reason() -> str | None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as error:
        return f"Redis at {REDIS_URL} (env KVRUN_TEST_REDIS) is unreachable: {error}"
    return None


_REDIS_SKIP = _redis_unavailable_reason()


@pytest.fixture(params=["file", "redis"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "file":
        yield f"file://{tmp_path / 'registry'}"
        return
    if _REDIS_SKIP:
        pytest.skip(_REDIS_SKIP)
    prefix = f"kvrun-test-{uuid.uuid4().hex[:12]}:"
    separator = "&" if "?" in REDIS_URL else "?"
    yield f"{REDIS_URL}{separator}prefix={prefix}"
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def store(registry_url: str) -> Iterator[AdapterStore]:
    with open_store(registry_url, token="", chunk_size=TEST_CHUNK_SIZE) as opened:
        yield opened


def stored_chunks(store: AdapterStore) -> set[str]:
    return set(store.storage.list_chunks())


def assert_empty(store: AdapterStore) -> None:
    """Nothing visible and no payload left behind."""
    assert store.list_adapters() == []
    assert stored_chunks(store) == set()


AdapterFactory = Callable[..., Path]


def write_adapter(
    directory: Path,
    *,
    rank: int = 4,
    hidden: int = 16,
    layers: int = 2,
    modules: tuple[str, ...] = ("q_proj", "v_proj"),
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    config: dict[str, object] | None = None,
) -> Path:
    """A tiny PEFT-style adapter: keys `base_model.model.model.layers.N.self_attn.M.lora_{A,B}.weight`."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for module in modules:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(hidden, rank, generator=generator).to(dtype)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(modules),
        "bias": "none", "use_dora": False, "modules_to_save": None, "base_model_name_or_path": "tiny/base",
        "task_type": "CAUSAL_LM", "rank_pattern": {}, "alpha_pattern": {},
    }  # fmt: skip
    adapter_config.update(config or {})
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config))
    return directory


@pytest.fixture
def make_adapter(tmp_path: Path) -> AdapterFactory:
    counter = iter(range(1_000_000))

    def make(**options: object) -> Path:
        return write_adapter(tmp_path / f"adapter-{next(counter)}", **options)  # type: ignore[arg-type]

    return make


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def write_tensors(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(directory / "adapter_model.safetensors"))
