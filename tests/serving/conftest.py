"""Fixtures for the serving tests: a tiny random Llama that has the bundled tokenizer, eight PEFT adapters, real
registries (a directory and Redis), and real servers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
import torch

from kvrun import LLM, SamplingParams
from kvrun.runtime.loader import resolve_model
from kvrun.serving import ServerConfig
from tests.factories import AdapterSpec, make_adapter, tiny_llama
from tests.serving.server import RunningServer, start_server

REDIS_URL = os.environ.get("KVRUN_TEST_REDIS", "redis://127.0.0.1:6379")
VOCAB = 49152  # the bundled tokenizer's vocabulary, so every token id of a text prompt exists in the tiny model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
ADAPTER_SPECS = (
    AdapterSpec("attn-r4", 4, ("q_proj", "v_proj")),
    AdapterSpec("all-r8", 8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    AdapterSpec("mlp-r16", 16, ("gate_proj", "up_proj", "down_proj"), alpha=8.0, use_rslora=True),
    AdapterSpec("ko-r2", 2, ("k_proj", "o_proj"), alpha=4.0),
    AdapterSpec("qkv-r8", 8, ("q_proj", "k_proj", "v_proj")),
    AdapterSpec("down-r4", 4, ("down_proj",)),
    AdapterSpec("o-r16", 16, ("o_proj",), alpha=32.0),
    AdapterSpec("up-r2", 2, ("up_proj", "gate_proj")),
)
MAX_MODEL_LEN = 2048
GAIN = 4.0  # scale lora_B so every adapter visibly changes the tiny model's greedy choices


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    base = tiny_llama(tmp_path_factory.mktemp("serving") / "tiny", num_heads=4, num_kv_heads=2, tie=False, vocab=VOCAB)
    bundled = resolve_model(None)
    for name in TOKENIZER_FILES:
        shutil.copy(bundled / name, base / name)
    # A longer context than the factory's 256, so a stream can stay in flight while a test changes the registry.
    config_file = base / "config.json"
    config = json.loads(config_file.read_text())
    config["max_position_embeddings"] = MAX_MODEL_LEN
    config_file.write_text(json.dumps(config))
    return base


def amplified_adapter(base: Path, spec: AdapterSpec, out_dir: Path, seed: int) -> Path:
    from safetensors.torch import load_file, save_file

    make_adapter(base, spec, out_dir, seed)
    weights_file = out_dir / "adapter_model.safetensors"
    weights = {key: value * GAIN if "lora_B" in key else value for key, value in load_file(weights_file).items()}
    save_file(weights, weights_file)
    return out_dir


@pytest.fixture(scope="session")
def adapter_dirs(model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        spec.name: amplified_adapter(model_dir, spec, root / spec.name, seed=index + 11)
        for index, spec in enumerate(ADAPTER_SPECS)
    }


@pytest.fixture(scope="session")
def foreign_adapter(tmp_path_factory) -> Path:
    """A valid PEFT adapter for a different base (hidden size 32): incompatible with model_dir."""
    root = tmp_path_factory.mktemp("foreign")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "base", safe_serialization=True)
    return make_adapter(root / "base", AdapterSpec("foreign", 4, ("q_proj", "v_proj")), root / "adapter", seed=3)


@pytest.fixture
def file_registry(tmp_path) -> str:
    return f"file://{tmp_path / 'registry'}"


@pytest.fixture
def redis_registry() -> str:
    prefix = f"kvrun-test-{uuid.uuid4().hex[:12]}:"
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()  # a real redis-server must answer (make test starts one)
    yield f"{REDIS_URL.rstrip('/')}/0?prefix={prefix}"
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(params=["file", "redis"])
def registry(request) -> str:
    return request.getfixturevalue(f"{request.param}_registry")


def registry_cli(registry_url: str, *args: str) -> dict | list:
    """Run the real `kvrun-adapters` CLI (as a fine-tuning team would) and return its --json output."""
    executable = Path(sys.executable).parent / "kvrun-adapters"  # the console script pip installed
    command = [str(executable), "--registry", registry_url, "--json", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kvrun-adapters {' '.join(args)} failed: {done.stderr}"
    return json.loads(done.stdout) if done.stdout.strip() else {}


def push(registry_url: str, directory: Path, name: str, *tags: str) -> dict:
    tag_args = [arg for tag in tags for arg in ("--tag", tag)]
    return registry_cli(registry_url, "push", "--name", name, *tag_args, str(directory))


def server_config(model_dir: Path, registry_url: str | None, **overrides) -> ServerConfig:
    settings = dict(
        model=str(model_dir), registry=registry_url, use_registry=registry_url is not None, max_loras=4,
        max_lora_rank=16, max_cpu_loras=8, num_blocks=1024, block_size=4, max_num_seqs=64, queue_timeout_s=60,
    )  # fmt: skip
    return ServerConfig(**{**settings, **overrides})


@pytest.fixture
def serve(model_dir):
    """Start servers for one test: `serve(registry_url, **config)`; all are stopped when the test ends."""
    running: list[RunningServer] = []

    def start(registry_url: str | None = None, **overrides) -> RunningServer:
        server = start_server(server_config(model_dir, registry_url, **overrides))
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


@pytest.fixture(scope="session")
def shared_registry(tmp_path_factory) -> str:
    return f"file://{tmp_path_factory.mktemp('shared-registry')}"


REGISTRY_ADAPTERS = ADAPTER_SPECS[:4]  # pushed to the shared registry as team/<name>
PATH_ADAPTERS = ADAPTER_SPECS[4:]  # loaded into the shared server through /v1/load_lora_adapter


@pytest.fixture(scope="session")
def shared_server(model_dir, adapter_dirs, shared_registry) -> RunningServer:
    """One server for the read-only tests: four adapters in its registry, four loaded from paths."""
    for spec in REGISTRY_ADAPTERS:
        push(shared_registry, adapter_dirs[spec.name], f"team/{spec.name}", "prod")
    server = start_server(server_config(model_dir, shared_registry))
    with server.client() as client:
        for spec in PATH_ADAPTERS:
            response = client.post("/v1/load_lora_adapter",
                                   json={"lora_name": spec.name, "lora_path": str(adapter_dirs[spec.name])})
            assert response.status_code == 200, response.text
    yield server
    server.stop()


def model_names() -> list[str | None]:
    """The nine ways the shared server's requests pick weights: base, four registry refs, four path names."""
    return [None, *(f"team/{spec.name}" for spec in REGISTRY_ADAPTERS), *(spec.name for spec in PATH_ADAPTERS)]


@pytest.fixture(scope="session")
def reference(model_dir, adapter_dirs):
    """The offline engine (kvrun.LLM) with every adapter loaded under the names the shared server uses."""
    llm = LLM(str(model_dir), max_loras=8, max_lora_rank=16, num_blocks=1024, block_size=4)
    for spec in REGISTRY_ADAPTERS:
        llm.load_adapter(f"team/{spec.name}", adapter_dirs[spec.name])
    for spec in PATH_ADAPTERS:
        llm.load_adapter(spec.name, adapter_dirs[spec.name])
    return llm


def reference_name(adapter: str) -> str:
    """The name the reference engine knows an adapter (of ADAPTER_SPECS) by."""
    return f"team/{adapter}" if adapter in {spec.name for spec in REGISTRY_ADAPTERS} else adapter


def greedy(llm, prompts, adapters, max_tokens: int, **params) -> list[list[int]]:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, **params)
    return [output.token_ids for output in llm.generate(prompts, sampling, adapters=adapters)]
