"""`kvrun serve` start-up as a user meets it: vLLM's flags, `--help` with defaults, and every failure to start as one
line `kvrun: error: ...` with its documented exit status (no traceback), found before the model loads where it can."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from kvrun.serving.main import EXIT_ADDRESS_IN_USE, EXIT_ERROR, EXIT_USAGE
from tests.serving.conftest import greedy

KVRUN = str(Path(sys.executable).parent / "kvrun")


def _run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([KVRUN, "serve", *args], capture_output=True, text=True, timeout=timeout)


def _one_error_line(done: subprocess.CompletedProcess, status: int) -> str:
    assert done.returncode == status, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("kvrun: error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    return errors[0]


def test_missing_model_is_one_line():
    line = _one_error_line(_run("/no/such/model", "--registry", "none"), EXIT_ERROR)
    assert "'/no/such/model' not found" in line


def test_hub_id_says_what_kvrun_serves():
    line = _one_error_line(_run("meta-llama/Llama-3.1-8B-Instruct", "--registry", "none"), EXIT_ERROR)
    assert "local HF model directories" in line and ".gguf" in line
    assert "huggingface-cli download meta-llama/Llama-3.1-8B-Instruct --local-dir DIR" in line


def test_taken_port_is_reported_before_the_model_loads(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _run(str(model_dir), "--port", str(port), "--registry", "none", "--log-level", "info")
    line = _one_error_line(done, EXIT_ADDRESS_IN_USE)
    assert f"127.0.0.1:{port}" in line and "--port" in line
    assert "loaded" not in done.stderr  # the load-time line comes after the model loaded: it never did


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--lora-modules", "no-equals-sign"), "expected name=path"),
        (("--lora-modules", '{"name": "x"}'), 'JSON with "name" and "path"'),
        (("--chat-template", "/no/such/template.jinja"), "no such file"),
        (("--max-queue", "-1"), "--max-queue"),
        (("--cuda-graph-max-tokens", "-1"), "--cuda-graph-max-tokens must be >= 0"),
        (("--gpu-memory-utilization", "1.5"), "--gpu-memory-utilization must be a number in (0, 1], got 1.5"),
        (("--kv-cache-mib", "0"), "--kv-cache-mib must be >= 1, got 0"),
        (("--max-model-len", "-5"), "--max-model-len must be an integer >= 1, got -5"),
        (("--max-num-seqs", "300", "--max-num-batched-tokens", "256"), "--max-num-batched-tokens (256) must be >="),
        (("a/b", "--model", "c/d"), "two models"),
    ],
)
def test_bad_flags_are_usage_errors(args, expected):
    assert expected in _one_error_line(_run(*args, "--registry", "none"), EXIT_USAGE)


def test_bad_lora_module_fails_start_in_one_line(model_dir, tmp_path):
    done = _run(str(model_dir), "--registry", "none", "--port", "0", "--lora-modules", f"bad={tmp_path / 'none'}")
    line = _one_error_line(done, EXIT_ERROR)
    assert "--lora-modules bad=" in line and "not a directory" in line


def test_help_shows_defaults():
    done = subprocess.run([KVRUN, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for expected in ("--port PORT port to listen on (default: 8000)",
                     "--max-loras MAX_LORAS adapter slots in the model (default: chosen from GPU memory",
                     "--served-model-name", "--lora-modules NAME=PATH", "--chat-template", "--tokenizer", "MODEL"):
        assert expected in text, expected


def test_lora_modules_served_model_name_and_chat_template(serve, adapter_dirs, reference):
    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    server = serve(None, served_model_name="my-base", lora_modules=(("sql", str(adapter_dirs["o-r16"])),),
                   chat_template=template)  # fmt: skip
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    ids = [model.id for model in client.models.list().data]
    assert ids[0] == "my-base" and "sql" in ids
    completion = client.completions.create(model="sql", prompt="The sea is", max_tokens=4, temperature=0,
                                           extra_body={"return_token_ids": True})  # fmt: skip
    assert completion.choices[0].token_ids == greedy(reference, ["The sea is"], ["o-r16"], 4)[0]
    with server.client() as http:
        tokens = http.post("/tokenize", json={"model": "my-base", "messages": [{"role": "user", "content": "hi"}]})
    assert tokens.status_code == 200, tokens.text
    assert tokens.json()["tokens"] == reference.tokenizer.encode("<<hi>>", add_special_tokens=True)
