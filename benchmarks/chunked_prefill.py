"""Running streams' inter-token latency while a long prompt arrives: whole prompts vs chunked prefill, one run.

Each configuration runs the bundled SmolLM2-135M-Instruct on CPU (fp32), or with `--llama3-8b` random bf16 weights of
Llama-3-8B's shapes on a GPU (greedy, EOS ignored): `--streams` requests decode; once each has produced `--warmup-tokens`, a `--long`-token prompt arrives. The table gives the streams'
inter-token latency (ITL) over the window from that arrival until the long prompt's first token, that window's
length (the long prompt's time to first token) and its step count, and the longest gap any stream saw, beside the
decode step time just before the prompt arrived. The first row is the baseline: the prompt runs whole in one step
(chunked prefill off). `--adapters N` spreads the streams over N random r`--rank` adapters (the long prompt uses the
base model); `--eager-too` adds, per budget, a run whose steps with prompt tokens run eagerly
(`cuda_graph_max_tokens=0`) instead of replaying CUDA graphs captured in pieces.

    .venv/bin/python benchmarks/chunked_prefill.py [--streams 8] [--long 2000] [--budgets 256,512,1024]
    python benchmarks/chunked_prefill.py --llama3-8b --streams 32 --long 8000 --budgets 256,512,2048   # GPU
    python benchmarks/chunked_prefill.py --llama3-8b --streams 128 --adapters 8 --long 4000 --budgets 512,2048 --eager-too
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_e2e import LLAMA3_8B, random_adapters  # noqa: E402


def run(llm, args, label: str, seed: int) -> dict:
    from kvrun import SamplingParams

    engine = llm.engine
    generator = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    stream_params = SamplingParams(max_tokens=args.warmup_tokens + 400, temperature=0.0, ignore_eos=True)
    names = [None, *engine.adapters.names()] if engine.adapters is not None else [None]
    streams = [
        engine.add_request(
            torch.randint(100, vocab, (args.prompt,), generator=generator).tolist(), stream_params,
            names[index % len(names)],
        )
        for index in range(args.streams)
    ]
    while min(len(stream.output_token_ids) for stream in streams) < args.warmup_tokens:
        engine.step()
    decode_steps = []
    for _ in range(8):  # every stream decoding: the step time the gaps compare with
        started = time.perf_counter()
        engine.step()
        decode_steps.append(time.perf_counter() - started)
    long_prompt = torch.randint(100, vocab, (args.long,), generator=generator).tolist()
    long_request = engine.add_request(long_prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    last_token = {stream.request_id: time.perf_counter() for stream in streams}
    gaps: list[float] = []
    arrival = time.perf_counter()
    steps = 0
    while not long_request.is_finished:
        outputs = engine.step()
        now = time.perf_counter()
        steps += 1
        for output in outputs:
            if output.request_id in last_token:
                gaps.append(now - last_token[output.request_id])
                last_token[output.request_id] = now
    ttft = time.perf_counter() - arrival
    for stream in streams:
        engine.abort_request(stream.request_id)
    gaps.sort()
    return {
        "label": label,
        "decode_step": statistics.median(decode_steps) * 1e3,
        "itl_p50": statistics.median(gaps) * 1e3,
        "itl_p99": gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] * 1e3,
        "itl_max": gaps[-1] * 1e3,
        "ttft": ttft,
        "steps": steps,
        "tokens": len(gaps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens of each running stream")
    parser.add_argument("--warmup-tokens", type=int, default=8)
    parser.add_argument("--long", type=int, default=2000, help="tokens of the prompt that arrives")
    parser.add_argument("--budgets", default="256,512,1024", help="max_num_batched_tokens of the chunked runs")
    parser.add_argument("--llama3-8b", action="store_true", help="random bf16 weights of Llama-3-8B's shapes (GPU)")
    parser.add_argument("--adapters", type=int, default=0, help="streams cycle over the base model and N adapters")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--eager-too", action="store_true",
                        help="per budget, also a run with steps with prompt tokens eager (cuda_graph_max_tokens=0)")
    args = parser.parse_args()

    from kvrun import LLM

    budgets = [int(value) for value in args.budgets.split(",")]
    whole_budget = max(budgets)
    configurations = [("whole prompts (chunked prefill off)", whole_budget, False, None)]
    for budget in budgets:
        configurations.append((f"chunked, budget {budget} tokens", budget, True, None))
        if args.eager_too:
            configurations.append((f"chunked, budget {budget} tokens, eager steps", budget, True, 0))
    results = []
    with tempfile.TemporaryDirectory() as model_dir:
        model = {}
        if args.llama3_8b:
            (Path(model_dir) / "config.json").write_text(json.dumps(LLAMA3_8B))
            model = {"model": model_dir, "load_format": "dummy", "dtype": "bfloat16"}
        for label, budget, chunked, graph_tokens in configurations:
            if graph_tokens is not None:
                model["cuda_graph_max_tokens"] = graph_tokens
            else:
                model.pop("cuda_graph_max_tokens", None)
            llm = LLM(**model, max_loras=args.adapters, max_lora_rank=max(args.rank, 8),
                      max_cpu_loras=max(args.adapters, 1), max_num_seqs=max(args.streams + 1, 8),
                      max_num_batched_tokens=max(budget, args.streams + 1), enable_chunked_prefill=chunked,
                      enable_prefix_caching=False, num_blocks=-(-(args.long + 2048 * args.streams) // 16))  # fmt: skip
            if args.adapters:
                engine = llm.engine
                device, dtype = engine.runner.device, engine.runner.dtype
                for parsed in random_adapters(args.adapters, args.rank, engine.model_config, dtype, device):
                    engine.adapters.add(parsed, lambda parsed=parsed: parsed)
            run(llm, argparse.Namespace(**{**vars(args), "long": 64}), "warm-up", seed=1)
            results.append(run(llm, args, label, seed=2))
            del llm

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.streams} streams decoding, a {args.long}-token prompt arrives; {where}\n")
    print("| configuration | decode step ms | stream ITL p50 ms | ITL p99 ms | ITL p99 / decode step | "
          "longest gap ms | long prompt TTFT s | steps |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['label']} | {row['decode_step']:.1f} | {row['itl_p50']:.1f} | {row['itl_p99']:.1f} | "
              f"{row['itl_p99'] / row['decode_step']:.1f}x | {row['itl_max']:.1f} | {row['ttft']:.2f} | "
              f"{row['steps']} |")  # fmt: skip


if __name__ == "__main__":
    main()
