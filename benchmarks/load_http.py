"""`kvrun serve` over HTTP at several concurrencies against the offline engine on the same prompts, in one run.

For each concurrency C, C clients stream `/v1/completions` in a closed loop (a client sends its next request when
its previous one ends) until `--rounds` × C requests are done; then, with the server stopped, the offline engine
(`kvrun.LLM` in this process, the same settings) runs the same prompts, adapters and lengths with C requests in
flight. A second row per C mixes in long prompts (every `--long-every`-th request has `--long-prompt-tokens`
tokens), to show what they do to the other streams' inter-token latency. EOS is ignored, so every request makes
exactly --max-tokens tokens; a warm-up (excluded) loads each adapter first. Adapters are random PEFT LoRA
checkpoints shaped for the model (all seven projections), so the numbers measure serving, not quality.

    # CPU, bundled SmolLM2 (small numbers):
    .venv/bin/python benchmarks/load_http.py --serve --concurrency 4,8 --adapters 4 --max-tokens 16 \
        --prompt-tokens 32 --long-prompt-tokens 512
    # GPU, Llama-3-8B shapes with random bf16 weights, default engine settings:
    python benchmarks/load_http.py --serve --llama3-8b --concurrency 32,64,128 --adapters 8 --rank 16 \
        --max-tokens 128 --prompt-tokens 128 --long-prompt-tokens 4000
    # one load against a running server (no offline run):
    python benchmarks/load_http.py --url http://127.0.0.1:8000 --registry redis://127.0.0.1:6379/0 -c 64 -m 16

Columns: output tok/s (HTTP, and offline with the ratio HTTP/offline), TTFT p50/p99 and ITL p50/p99 in ms (HTTP;
ITL over the short requests only), and the offline engine's median step time, the floor ITL cannot beat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WORDS = ("river stone lamp harbor winter garden letter engine violet thunder market candle orbit meadow silver "
         "bridge forest pencil window copper falcon island mirror rocket saddle tunnel velvet anchor basket").split()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass
class Sample:
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive tokens
    tokens: int = 0
    latency: float = 0.0
    long: bool = False  # a long prompt (its own gaps are not counted in ITL)


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


@dataclass(frozen=True)
class Job:
    prompt: str
    model_index: int  # 0 = base model, i = adapter i - 1
    long: bool = False


@dataclass
class Result:
    samples: list[Sample]
    duration: float
    step_ms: float | None = None  # offline: the median engine step

    def tokens_per_s(self) -> float:
        return sum(sample.tokens for sample in self.samples) / self.duration

    def ttft_ms(self, q: float) -> float:
        return percentile([sample.ttft * 1000 for sample in self.samples], q)

    def itl_ms(self, q: float) -> float:
        return percentile([gap * 1000 for sample in self.samples if not sample.long for gap in sample.gaps], q)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def make_prompts(tokenizer, count: int, tokens: int, seed: int) -> list[str]:
    """Distinct prompts of about `tokens` tokens (distinct from their first words, so no prefix is shared)."""
    rng = random.Random(seed)
    prompts = []
    for index in range(count):
        words = [f"Request {seed}-{index}:"] + [rng.choice(WORDS) for _ in range(tokens)]
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)[: max(1, tokens - 1)]
        prompts.append(tokenizer.decode(ids))
    return prompts


def make_jobs(tokenizer, args, concurrency: int, with_long: bool, seed: int) -> list[Job]:
    count = args.rounds * concurrency
    short = make_prompts(tokenizer, count, args.prompt_tokens, seed)
    long = make_prompts(tokenizer, count, args.long_prompt_tokens, seed + 1) if with_long else []
    jobs = []
    for index in range(count):
        is_long = with_long and index % args.long_every == args.long_every - 1
        jobs.append(Job(long[index] if is_long else short[index], index % (args.adapters + 1), is_long))
    return jobs


# -- HTTP ------------------------------------------------------------------------------------------------------------
async def one_request(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, long: bool = False) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}  # fmt: skip
    sample, started = Sample(long=long), time.perf_counter()
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


async def http_load(http: httpx.AsyncClient, models: list[str], jobs: list[Job], concurrency: int,
                    max_tokens: int) -> Result:  # fmt: skip
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    samples: list[Sample] = []

    async def client() -> None:
        while not queue.empty():
            job = queue.get_nowait()
            samples.append(await one_request(http, models[job.model_index], job.prompt, max_tokens, job.long))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return Result(samples, time.perf_counter() - started)


async def publish_adapters(http: httpx.AsyncClient, args, directories: list[Path]) -> list[str]:
    names = []
    for index, directory in enumerate(directories):
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


async def http_runs(args, url: str, directories: list[Path], plans: list[tuple[int, bool, list[Job]]]) -> list[Result]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(concurrency for concurrency, _, _ in plans) + 8)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=3600, limits=limits) as http:
        base = (await http.get("/v1/models")).json()["data"][0]["id"]
        models = [base, *await publish_adapters(http, args, directories)]
        await asyncio.gather(*(one_request(http, model, "Warm up.", 2) for model in models))
        results = []
        for concurrency, with_long, jobs in plans:
            results.append(await http_load(http, models, jobs, concurrency, args.max_tokens))
            print(f"HTTP C={concurrency}{' + long prompts' if with_long else ''}: "
                  f"{results[-1].tokens_per_s():.1f} tok/s", flush=True)  # fmt: skip
    return results


def start_server(args, model: str | None, work: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args.registry = args.registry or f"file://{work / 'registry'}"
    command = [sys.executable, "-m", "kvrun.cli", "serve", "--port", str(port), "--registry", args.registry,
               "--log-level", "warning", "--log-interval", "0", *engine_flags(args)]  # fmt: skip
    if model:
        command += ["--model", model]
    command += args.server_args.split()
    print("server: kvrun", " ".join(command[3:]), flush=True)
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


# -- offline ---------------------------------------------------------------------------------------------------------
def offline_runs(args, model: str | None, directories: list[Path], plans) -> list[Result]:
    from kvrun import LLM

    settings = engine_settings(args)
    if args.max_num_batched_tokens is None and torch.cuda.is_available():
        # The server's default step budget (kvrun serve is an online engine), not the offline LLM's larger one.
        from kvrun.runtime.memory_plan import GPU_ONLINE_MAX_NUM_BATCHED_TOKENS

        settings["max_num_batched_tokens"] = GPU_ONLINE_MAX_NUM_BATCHED_TOKENS
    llm = LLM(model, **settings)
    names = [None]
    for index, directory in enumerate(directories):
        llm.load_adapter(f"bench-adapter-{index}", directory)
        names.append(f"bench-adapter-{index}")
    llm.generate(["Warm up."] * len(names), _params(2), adapters=names)
    results = []
    for concurrency, with_long, jobs in plans:
        results.append(_in_a_thread(offline_load, llm, names, jobs, concurrency, args.max_tokens))
        print(f"offline C={concurrency}{' + long prompts' if with_long else ''}: "
              f"{results[-1].tokens_per_s():.1f} tok/s", flush=True)  # fmt: skip
    del llm
    return results


def offline_load(llm, names: list[str | None], jobs: list[Job], concurrency: int, max_tokens: int) -> Result:
    """The engine with `concurrency` requests in flight, a new one added as each finishes (as the HTTP clients do)."""
    engine = llm.engine
    pending = list(reversed(jobs))
    live: dict[str, tuple[Sample, float, float | None]] = {}  # request id → (sample, added, last token)
    samples, steps = [], []
    params = _params(max_tokens)
    started = time.perf_counter()
    while pending or live:
        while pending and len(live) < concurrency:
            job = pending.pop()
            request = engine.add_request(job.prompt, params, names[job.model_index])
            live[request.request_id] = (Sample(long=job.long), time.perf_counter(), None)
        step_started = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        steps.append(now - step_started)
        for output in outputs:
            sample, added, last = live[output.request_id]
            count = len(output.new_token_ids)
            if count:
                if last is None:
                    sample.ttft = now - added
                else:
                    sample.gaps += [(now - last) / count] * count
                sample.tokens += count
                live[output.request_id] = (sample, added, now)
            if output.finished:
                sample.latency = now - added
                samples.append(sample)
                del live[output.request_id]
    return Result(samples, time.perf_counter() - started, 1000 * percentile(steps, 50))


def _in_a_thread(function, *args):
    """Run function(*args) in a thread of its own, as the server's engine runs: on CPU, torch's OpenMP team of the
    main thread spins at every op's barrier, and on a busy machine its steps took many times as long."""
    result = []
    worker = threading.Thread(target=lambda: result.append(function(*args)), name="offline-engine")
    worker.start()
    worker.join()
    return result[0]


def _params(max_tokens: int):
    from kvrun import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


# -- settings shared by the server and the offline engine -------------------------------------------------------------
SIZING = ("max_loras", "max_lora_rank", "max_num_seqs", "max_num_batched_tokens")  # passed to both only when given


def engine_settings(args) -> dict:
    settings = {name: getattr(args, name) for name in SIZING if getattr(args, name) is not None}
    if args.kv_cache_mib:
        settings["kv_cache_memory_bytes"] = args.kv_cache_mib << 20
    return {**settings, "load_format": args.load_format}


def engine_flags(args) -> list[str]:
    flags = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in SIZING if getattr(args, name) is not None]
    if args.kv_cache_mib:
        flags.append(f"--kv-cache-mib={args.kv_cache_mib}")
    return [*flags, f"--load-format={args.load_format}"]


def llama3_8b_dir(work: Path, tokenizer_from: str | None) -> Path:
    """Llama-3-8B's config.json (no weights: served with --load-format dummy) and the bundled tokenizer."""
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_e2e import LLAMA3_8B
    from kvrun.runtime.loader import resolve_model

    model_dir = work / "llama3-8b-shapes"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(LLAMA3_8B))
    bundled = Path(tokenizer_from) if tokenizer_from else resolve_model(None)
    for name in TOKENIZER_FILES:
        if (bundled / name).is_file():
            shutil.copy(bundled / name, model_dir / name)
    return model_dir


def table(plans, http: list[Result], offline: list[Result] | None) -> str:
    lines = ["| C | long prompts | HTTP tok/s | offline tok/s | HTTP/offline | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
             "| ITL p99 ms | offline step p50 ms | offline TTFT p99 ms | offline ITL p99 ms |",
             "|" + "---|" * 12]  # fmt: skip
    for index, (concurrency, with_long, _) in enumerate(plans):
        ours, theirs = http[index], offline[index] if offline else None
        cells = [str(concurrency), "yes" if with_long else "no", f"{ours.tokens_per_s():.1f}"]
        if theirs is not None:
            cells += [f"{theirs.tokens_per_s():.1f}", f"{ours.tokens_per_s() / theirs.tokens_per_s():.0%}"]
        else:
            cells += ["-", "-"]
        cells += [f"{ours.ttft_ms(50):.0f}", f"{ours.ttft_ms(99):.0f}", f"{ours.itl_ms(50):.1f}", f"{ours.itl_ms(99):.1f}"]
        if theirs is not None:
            cells += [f"{theirs.step_ms:.1f}", f"{theirs.ttft_ms(99):.0f}", f"{theirs.itl_ms(99):.1f}"]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="kvrun-load-"))
    try:
        model = str(llama3_8b_dir(work, args.tokenizer_from)) if args.llama3_8b else args.model
        from kvrun.engine.tokenizer import load_tokenizer
        from kvrun.runtime.loader import resolve_model

        model_dir = Path(args.model_dir) if args.model_dir else resolve_model(model, needs_weights=False)
        tokenizer = load_tokenizer(model_dir)
        directories = [make_adapter(model_dir, work / f"adapter-{index}", args.rank, seed=index)
                       for index in range(args.adapters)]  # fmt: skip
        plans = []
        for concurrency in args.concurrency:
            plans.append((concurrency, False, make_jobs(tokenizer, args, concurrency, False, seed=concurrency)))
            if args.long_prompt_tokens:
                plans.append((concurrency, True, make_jobs(tokenizer, args, concurrency, True, seed=concurrency + 7)))
        process = None
        try:
            if args.url is None:
                process, args.url = start_server(args, model, work)
            http = asyncio.run(http_runs(args, args.url, directories, plans))
        finally:
            if process is not None:
                stop_server(process)
        offline = offline_runs(args, model, directories, plans) if args.serve and not args.no_offline else None
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        print(f"\nkvrun HTTP vs offline: {model or 'bundled SmolLM2'} on {device}, {args.adapters} adapter(s) of rank "
              f"{args.rank} + base, prompt {args.prompt_tokens} tokens, {args.max_tokens} new tokens, "
              f"{args.rounds} rounds of C requests; long prompts: {args.long_prompt_tokens} tokens, one request in "
              f"{args.long_every}; server flags: {' '.join(engine_flags(args) + args.server_args.split())}")
        print(table(plans, http, offline))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running kvrun server (no offline run)")
    target.add_argument("--serve", action="store_true", help="start `kvrun serve`, then run the offline engine")
    parser.add_argument("--model", default=None, help="with --serve: the model (default: the bundled SmolLM2)")
    parser.add_argument("--llama3-8b", action="store_true", help="Llama-3-8B shapes, random weights (GPU)")
    parser.add_argument("--model-dir", default=None, help="the served model's HF directory (shapes adapters, tokenizes)")
    parser.add_argument("--registry", default=None, help="push adapters here (default with --serve: a temp dir)")
    parser.add_argument("--api-key", default=os.environ.get("KVRUN_API_KEY"))
    parser.add_argument("-c", "--concurrency", default="32,64,128", help="comma-separated concurrencies")
    parser.add_argument("-m", "--adapters", type=int, default=4, help="requests cycle over base + these adapters")
    parser.add_argument("--rounds", type=int, default=2, help="requests per concurrency C: rounds x C")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--long-prompt-tokens", type=int, default=0, help="0: no run with long prompts")
    parser.add_argument("--long-every", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-num-seqs", type=int, default=None, help="server and offline (default: the engine's)")
    parser.add_argument("--max-loras", type=int, default=None, help="server and offline (default: the engine's)")
    parser.add_argument("--max-lora-rank", type=int, default=None, help="server and offline (default: the engine's)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="server and offline (default: the server's, for both)")
    parser.add_argument("--tokenizer-from", default=None,
                        help="with --llama3-8b: a model directory to copy the tokenizer from (default: the bundled one)")
    parser.add_argument("--kv-cache-mib", type=int, default=None, help="server and offline (default: the engine's)")
    parser.add_argument("--load-format", default=None, choices=["auto", "dummy"],
                        help="default: dummy with --llama3-8b, else auto")  # fmt: skip
    parser.add_argument("--server-args", default="", help="more `kvrun serve` flags, e.g. '--no-engine-process'")
    parser.add_argument("--no-offline", action="store_true", help="with --serve: skip the offline run")
    args = parser.parse_args(argv)
    args.concurrency = [int(value) for value in args.concurrency.split(",")]
    args.load_format = args.load_format or ("dummy" if args.llama3_8b else "auto")
    return args


if __name__ == "__main__":
    main()
