"""Prefix caching on CPU: a shared system prompt over several adapters, cache on vs off, one run.

The bundled SmolLM2-135M-Instruct (fp32) serves `--adapters` random r16 LoRA adapters; every request is the same
`--system`-token system prompt plus its own `--user`-token question, `--per-adapter` requests per adapter, all
submitted at once (greedy, `--new-tokens` each, EOS ignored). For each setting the table gives the prompt tokens the
model computed, the tokens served from the cache, time to first token (mean and worst over requests) and the wall
time (medians over `--repeat` alternating runs, each on fresh prompts). A second pair of rows runs prompts that share
nothing, to show what the cache costs when it cannot help.

    .venv/bin/python benchmarks/prefix_cache.py [--system 1000] [--adapters 8] [--per-adapter 2] [--user 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cpu_multi_lora import make_adapters  # noqa: E402


def run(llm, rows, new_tokens: int) -> dict:
    from kvrun import SamplingParams

    engine = llm.engine
    stats = engine.scheduler.stats
    computed, hits = stats.computed_prompt_tokens, stats.prefix_cache_hits
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    requests = [engine.add_request(prompt, params, adapter) for prompt, adapter in rows]
    first_token: dict[str, float] = {}
    while engine.has_unfinished():
        for output in engine.step():
            first_token.setdefault(output.request_id, time.perf_counter() - start)
    wall = time.perf_counter() - start
    ttfts = [first_token[request.request_id] for request in requests]
    return {
        "computed": stats.computed_prompt_tokens - computed,
        "hits": stats.prefix_cache_hits - hits,
        "ttft_mean": statistics.mean(ttfts),
        "ttft_max": max(ttfts),
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", type=int, default=1000, help="tokens of the shared system prompt")
    parser.add_argument("--user", type=int, default=32, help="tokens of each request's own question")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--per-adapter", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="runs per setting; the table gives medians")
    args = parser.parse_args()

    from kvrun import LLM
    from kvrun.runtime.loader import resolve_model

    generator = torch.Generator().manual_seed(0)

    def tokens(count: int) -> list[int]:
        return torch.randint(100, 49000, (count,), generator=generator).tolist()

    names = [f"adapter-{index}" for index in range(args.adapters)]

    def workload(shared_prefix: bool) -> list[tuple[list[int], str]]:
        system = tokens(args.system)
        return [((system if shared_prefix else tokens(args.system)) + tokens(args.user), name)
                for _ in range(args.per_adapter) for name in names]  # fmt: skip

    settings = {f"{what}, cache {'on' if caching else 'off'}": (shared_prefix, caching)
                for what, shared_prefix in (("shared system prompt", True), ("nothing shared", False))
                for caching in (False, True)}  # fmt: skip
    samples: dict[str, list[dict]] = {label: [] for label in settings}
    with tempfile.TemporaryDirectory() as root:
        adapters = make_adapters(resolve_model(None), args.adapters, 16, Path(root))
        engines = {}
        for caching in (False, True):
            llm = LLM(max_loras=args.adapters, max_lora_rank=16, max_num_seqs=args.adapters * args.per_adapter,
                      max_num_batched_tokens=2048, enable_prefix_caching=caching)  # fmt: skip
            for name, directory in adapters.items():
                llm.load_adapter(name, directory)
            run(llm, [(tokens(8), name) for name in names], 2)  # warm-up: every adapter into its slot
            engines[caching] = llm
        # Runs alternate between the settings, each on fresh prompts (nothing cached from an earlier repeat).
        for _ in range(args.repeat):
            for label, (shared_prefix, caching) in settings.items():
                samples[label].append(run(engines[caching], workload(shared_prefix), args.new_tokens))
    results = [(label, {key: statistics.median(row[key] for row in rows) for key in rows[0]})
               for label, rows in samples.items()]  # fmt: skip

    print(f"\n{args.adapters * args.per_adapter} requests ({args.per_adapter} per adapter, {args.adapters} r16 adapters), "
          f"{args.system}-token system prompt + {args.user}-token question, {args.new_tokens} new tokens; "
          f"CPU threads: {torch.get_num_threads()}; medians of {args.repeat} runs\n")  # fmt: skip
    print("| setting | prompt tokens computed | from cache | TTFT mean s | TTFT max s | wall s |")
    print("|---|---|---|---|---|---|")
    for label, row in results:
        print(f"| {label} | {row['computed']:.0f} | {row['hits']:.0f} | {row['ttft_mean']:.2f} | {row['ttft_max']:.2f} | "
              f"{row['wall']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
