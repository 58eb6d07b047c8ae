"""LoRA decode kernels: the shipped block-size rules against a sweep of shrink/expand configs, per module.

For each decode scenario (tokens, adapters, adapter rank, pool max_rank) and each Llama-3-8B module of one layer
(qkv, o, gate_up, down), times the Triton shrink and expand alone with the configs `kvrun/punica/triton/configs.py`
picks ("rules") and with every candidate config of a small grid, and prints the rule's time next to the best
candidate's, with both as a fraction of the measured copy bandwidth. Timings replay a CUDA graph over enough copies
of the layer's adapters that they cannot sit in L2 (as benchmarks/lora_kernels.py does). A pool max_rank above the
adapters' rank shows what padding slots costs (kvrun's default max_lora_rank is 64).

Usage on the GPU host:  python3 benchmarks/lora_decode_sweep.py [--out sweep.md] [--budget-s 240]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root

from benchmarks.lora_kernels import (  # noqa: E402  (shapes, timing and bandwidth shared with the kernel benchmark)
    DEVICE,
    DTYPE,
    L2_DEFEAT_BYTES,
    MODULES,
    copy_bandwidth,
)
from benchmarks.lora_kernels import _event_time_us as event_time_us  # noqa: E402
from kvrun.punica.metadata import LoRAKernelMeta  # noqa: E402
from kvrun.punica.triton.configs import ExpandConfig, ShrinkConfig, expand_config, shrink_config  # noqa: E402
from kvrun.punica.triton.expand import launch_expand  # noqa: E402
from kvrun.punica.triton.shrink import launch_shrink  # noqa: E402

SCENARIOS = [  # (tokens, adapters, adapter rank, pool max_rank)
    (32, 32, 16, 16),
    (32, 32, 16, 64),
    (128, 32, 16, 16),
    (128, 32, 16, 64),
    (32, 1, 16, 16),
]


def shrink_candidates(base: ShrinkConfig, in_features: int) -> list[ShrinkConfig]:
    found = []
    for block_k, split_k, warps, stages in itertools.product((256, 512), (1, 2, 4, 8, 16), (4, 8), (2, 4)):
        if split_k * block_k > in_features:
            continue
        found.append(ShrinkConfig(base.block_m, base.block_r, block_k, split_k, warps, stages, rank_programs=1))
    return found


def expand_candidates(base: ExpandConfig) -> list[ExpandConfig]:
    return [
        ExpandConfig(base.block_m, block_n, base.block_r, warps, stages)
        for block_n, warps, stages in itertools.product((128, 256), (4, 8), (1, 2))
    ]


def previous_rule(rule: ShrinkConfig, tokens: int, adapters: int, in_features: int, pool_rank: int, slices: int):
    """The rule before rank programs: a program per rank block of the pool's max_rank, counted in split-K's choice."""
    rank_blocks = math.ceil(pool_rank / rule.block_r)
    programs = (math.ceil(tokens / rule.block_m) + min(adapters, tokens)) * slices * rank_blocks
    in_flight = 4 * torch.cuda.get_device_properties(DEVICE).multi_processor_count
    split_k, k_blocks = 1, math.ceil(in_features / rule.block_k)
    while split_k * 2 <= k_blocks // 2 and programs * split_k * 2 <= in_flight:
        split_k *= 2
    return dataclasses.replace(rule, split_k=split_k, rank_programs=rank_blocks)


def graph_time_us(run_one, copies: int, iterations: int = 10) -> float:
    def run_all() -> None:
        for index in range(copies):
            run_one(index)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run_all()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_all()
    graph.replay()
    return event_time_us(graph.replay, iterations) / copies


def sweep_module(scenario, name: str, bandwidth: float) -> list[str]:
    tokens, adapters, rank, pool_rank = scenario
    in_features, outs = MODULES[name]
    per_copy = adapters * pool_rank * (in_features * len(outs) + sum(outs)) * 2
    copies = max(2, min(64, math.ceil(L2_DEFEAT_BYTES / per_copy)))
    lora_a = [[torch.randn(adapters, pool_rank, in_features, device=DEVICE, dtype=DTYPE) * 0.02 for _ in outs]
              for _ in range(copies)]
    lora_b = [[torch.randn(adapters, pool_rank, n, device=DEVICE, dtype=DTYPE) * 0.02 for n in outs]
              for _ in range(copies)]
    ranks = torch.full((len(outs), adapters), rank, dtype=torch.int32, device=DEVICE)
    scalings = torch.ones(len(outs), adapters, device=DEVICE)
    x = torch.randn(tokens, in_features, device=DEVICE, dtype=DTYPE)
    y = torch.zeros(len(outs), tokens, pool_rank, device=DEVICE)
    out = torch.zeros(tokens, sum(outs), device=DEVICE, dtype=DTYPE)
    offsets = [sum(outs[:i]) for i in range(len(outs))]
    token_slots = torch.randint(0, adapters, (tokens,), dtype=torch.int32, device=DEVICE)
    groups = LoRAKernelMeta(tokens, adapters, DEVICE).group_tokens(token_slots)
    group_args = (groups.token_order, groups.group_starts, groups.group_slots)
    shrink_bytes = (adapters * rank * len(outs) + tokens) * in_features * 2
    expand_bytes = (adapters * rank + 2 * tokens) * sum(outs) * 2

    def shrink_with(config):
        return lambda i: launch_shrink(x, lora_a[i], *group_args, ranks, scalings, y, config=config)

    def expand_with(config):
        return lambda i: launch_expand(y, lora_b[i], *group_args, ranks, out, offsets, config=config)

    # Shrink: the rule for the last launch chunk is the one that matters (one chunk for <= 3 slices).
    rule_s = shrink_config(tokens, adapters, in_features, pool_rank, len(outs), True, torch.device(DEVICE))
    rule_e = expand_config(tokens, adapters, pool_rank)
    lines = []
    for kind, rule, candidates, make, size in (
        ("shrink", rule_s, shrink_candidates(rule_s, in_features), shrink_with, shrink_bytes),
        ("expand", rule_e, expand_candidates(rule_e), expand_with, expand_bytes),
    ):
        rule_us = graph_time_us(make(None), copies)
        best_us, best = rule_us, rule
        if kind == "shrink":
            old = previous_rule(rule, tokens, adapters, in_features, pool_rank, len(outs))
            old_us = graph_time_us(make(old), copies)
            lines.append(f"| {tokens} | {adapters} | {rank} | {pool_rank} | {name} shrink, previous rule | {old_us:.1f} "
                         f"| {size / (old_us * 1e-6) / bandwidth * 100:.0f}% | | | {_describe(old)} |")
        for candidate in candidates:
            try:
                micros = graph_time_us(make(candidate), copies)
            except Exception as error:  # a config Triton cannot build: skip it
                print(f"  {kind} {candidate}: {type(error).__name__}", flush=True)
                continue
            if micros < best_us:
                best_us, best = micros, candidate
        percent = lambda micros: size / (micros * 1e-6) / bandwidth * 100  # noqa: E731
        lines.append(
            f"| {tokens} | {adapters} | {rank} | {pool_rank} | {name} {kind} | {rule_us:.1f} | {percent(rule_us):.0f}% "
            f"| {best_us:.1f} | {percent(best_us):.0f}% | {_describe(best)} |"
        )
        print(lines[-1], flush=True)
    return lines


def _describe(config) -> str:
    fields = config.__dataclass_fields__
    return " ".join(f"{name}={getattr(config, name)}" for name in fields)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--budget-s", type=float, default=240.0, help="no new scenario after this many seconds")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    torch.manual_seed(0)
    started = time.monotonic()
    bandwidth = copy_bandwidth()
    header = [
        f"{torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d')}, copy bandwidth {bandwidth / 1e12:.2f} TB/s",
        "",
        "| tokens | adapters | rank | pool max_rank | kernel | rules µs | rules %BW | best µs | best %BW | best config |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    lines = list(header)
    for scenario in SCENARIOS:
        if time.monotonic() - started > args.budget_s:
            lines.append(f"| {scenario} skipped: time budget |")
            break
        for name in MODULES:
            lines += sweep_module(scenario, name, bandwidth)
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
