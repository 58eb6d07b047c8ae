"""Drive kvrun's HTTP API at concurrency C over M adapters; print throughput, TTFT and inter-token latency.

    # start a server on the bundled model, push 4 random adapters to a throwaway registry, run 32 requests:
    python benchmarks/load_http.py --serve --concurrency 8 --adapters 4 --requests 32 --max-tokens 64
    # against a running server (e.g. on the GPU host); adapters go to its registry, or by path when none is given:
    python benchmarks/load_http.py --url http://127.0.0.1:8000 --registry redis://127.0.0.1:6379/0 -c 64 -m 16

Adapters are random PEFT LoRA checkpoints shaped for the served model (read from its config.json), so the numbers
measure serving, not quality. Requests stream `/v1/completions` with `ignore_eos`, so every request produces exactly
--max-tokens tokens; one warm-up request per adapter (excluded) loads each adapter first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a refrigerator works.",
           "List three facts about the moon.", "Describe your ideal breakfast."]  # fmt: skip


@dataclass
class Sample:
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive tokens
    tokens: int = 0
    latency: float = 0.0


def make_adapter(model_dir: Path, out_dir: Path, rank: int, seed: int) -> Path:
    """A random LoRA adapter (all seven projections) in PEFT's save_pretrained layout, for the model in model_dir."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_size = (config.get("num_key_value_heads") or heads) * head_dim
    inter = config["intermediate_size"]
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_size), "v_proj": (hidden, kv_size),
              "o_proj": (heads * head_dim, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, (in_features, out_features) in shapes.items():
            group = "self_attn" if module in MODULES[:4] else "mlp"
            key = f"base_model.model.model.layers.{layer}.{group}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "adapter_model.safetensors")
    adapter_config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES),
                      "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir)}  # fmt: skip
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config))
    return out_dir


async def publish_adapters(http: httpx.AsyncClient, args, model_dir: Path, work: Path) -> list[str]:
    names = []
    for index in range(args.adapters):
        directory = make_adapter(model_dir, work / f"adapter-{index}", args.rank, seed=index)
        if args.registry:
            from adapters_registry import open_store

            with open_store(args.registry) as store:
                record = store.push(directory, f"bench/adapter-{index}", tags=["bench"])
            names.append(record.ref)
        else:
            name = f"bench-adapter-{index}"
            response = await http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(directory),
                                                                     "load_inplace": True})  # fmt: skip
            response.raise_for_status()
            names.append(name)
    return names


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}  # fmt: skip
    sample, started = Sample(), time.perf_counter()
    last = None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            count = sum(len(choice.get("token_ids") or []) for choice in json.loads(line[6:])["choices"])
            if not count:
                continue
            now = time.perf_counter()
            if last is None:
                sample.ttft = now - started
            else:
                sample.gaps += [(now - last) / count] * count
            last, sample.tokens = now, sample.tokens + count
    sample.latency = time.perf_counter() - started
    return sample


async def run_load(http: httpx.AsyncClient, models: list[str], args) -> tuple[list[Sample], float]:
    queue: asyncio.Queue = asyncio.Queue()
    for index in range(args.requests):
        queue.put_nowait((models[index % len(models)], PROMPTS[index % len(PROMPTS)]))
    samples: list[Sample] = []

    async def worker() -> None:
        while not queue.empty():
            model, prompt = queue.get_nowait()
            samples.append(await one_request(http, model, prompt, args.max_tokens))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return samples, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def table(args, samples: list[Sample], duration: float) -> str:
    tokens = sum(sample.tokens for sample in samples)
    ttft = [sample.ttft * 1000 for sample in samples]
    itl = [gap * 1000 for sample in samples for gap in sample.gaps]
    header = ("| C | M | requests | tokens/req | duration s | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms "
              "| ITL p50 ms | ITL p99 ms |")  # fmt: skip
    row = (f"| {args.concurrency} | {args.adapters} | {len(samples)} | {args.max_tokens} | {duration:.1f} "
           f"| {len(samples) / duration:.2f} | {tokens / duration:.1f} | {percentile(ttft, 50):.0f} "
           f"| {percentile(ttft, 99):.0f} | {percentile(itl, 50):.1f} | {percentile(itl, 99):.1f} |")  # fmt: skip
    return "\n".join([header, "|" + "---|" * 11, row])


def start_server(args, work: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args.registry = args.registry or f"file://{work / 'registry'}"
    command = [str(Path(sys.executable).parent / "kvrun"), "serve", "--port", str(port), "--registry", args.registry,
               "--max-loras", str(max(1, args.adapters)), "--max-lora-rank", str(max(args.rank, 8)),
               "--max-num-seqs", str(max(args.concurrency, 1)), "--log-level", "warning"]  # fmt: skip
    if args.model:
        command += ["--model", args.model]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(process, url)
    return process, url


def stop_server(process: subprocess.Popen) -> None:
    """Ctrl-C to the server's process group (a graceful shutdown); SIGKILL if it is not gone within 30 s."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def wait_until_up(process: subprocess.Popen, url: str, path: str = "/health", timeout_s: float = 600) -> None:
    """Until `kvrun serve` answers 200 on path; raises if it exits or takes longer than timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kvrun serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("kvrun serve did not start")


async def model_dir_of(http: httpx.AsyncClient, args) -> tuple[str, Path]:
    """The served base model's id and a local directory with its config.json (to shape adapters)."""
    base = (await http.get("/v1/models")).json()["data"][0]
    if args.model_dir:
        return base["id"], Path(args.model_dir)
    root = Path(base.get("root") or "")
    if (root / "config.json").is_file():
        return base["id"], root
    from kvrun.runtime.loader import resolve_model

    return base["id"], resolve_model(args.model if args.model and Path(args.model).exists() else None)


async def main_async(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="kvrun-load-"))
    process = None
    try:
        if args.url is None:
            process, args.url = start_server(args, work)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        limits = httpx.Limits(max_connections=args.concurrency + 8)
        async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=600, limits=limits) as http:
            base, model_dir = await model_dir_of(http, args)
            models = await publish_adapters(http, args, model_dir, work) if args.adapters else [base]
            await asyncio.gather(*(one_request(http, model, PROMPTS[0], 2) for model in models))  # warm-up
            samples, duration = await run_load(http, models, args)
        print(f"kvrun HTTP load: {base} at {args.url}, {len(models)} model(s), rank {args.rank}")
        print(table(args, samples, duration))
    finally:
        if process is not None:
            stop_server(process)
        shutil.rmtree(work, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running kvrun server")
    target.add_argument("--serve", action="store_true", help="start `kvrun serve` for the run")
    parser.add_argument("--model", default=None, help="with --serve: the model (default: the bundled SmolLM2)")
    parser.add_argument("--model-dir", default=None, help="the served model's HF directory (to shape adapters)")
    parser.add_argument("--registry", default=None, help="push adapters here (default with --serve: a temp dir)")
    parser.add_argument("--api-key", default=os.environ.get("KVRUN_API_KEY"))
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("-m", "--adapters", type=int, default=4, help="0 = base model only")
    parser.add_argument("-n", "--requests", type=int, default=None, help="default: 4 x concurrency")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    args.requests = args.requests or 4 * args.concurrency
    return args


if __name__ == "__main__":
    asyncio.run(main_async(parse_args()))
