"""LoRA kernels at Llama-3-8B shapes: kvrun Triton vs flashinfer segment_gemm vs a torch gather+bmm loop.

One decoder layer's LoRA work is timed: shrink + expand for qkv (4096 -> 4096/1024/1024), o (4096 -> 4096),
gate_up (4096 -> 14336/14336) and down (14336 -> 4096), for 1/8/32/128 adapters, r = 8/16/64/mixed, decode batches
(32, 128 tokens, tokens spread over the adapters in shuffled order) and a prefill batch (2048 tokens).

How: random bf16 weights in the slot-pool layout; each measurement replays a CUDA graph (eager where a path syncs
with the host) over enough distinct copies of the layer's adapters that they cannot sit in L2, as in a real model
where each layer has its own; time per layer = CUDA-event time / copies. "Must-read" bytes per layer: the active
adapters' A and B up to each adapter's own rank, plus x read and the output read and written once per module.
Bandwidth is reported as a fraction of a measured device copy (1 GiB tensor, read + write). Decode grouping
(sorting tokens by slot) runs once per step for all layers and is timed separately. flashinfer has no per-adapter
rank: it computes up to the padded rank, so it runs the uniform-rank rows only; its output add is included. Every
path is first checked against the torch loop on one layer (a mismatch is noted in the row).

Usage on the GPU host (after `source .gpu-bundle/activate` for flashinfer):
    python3 benchmarks/lora_kernels.py [--out results.md] [--quick] [--flashinfer auto|off]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root

from kvrun.punica import REFERENCE_OPS  # noqa: E402
from kvrun.punica.metadata import LoRAKernelMeta, SlotGroups  # noqa: E402

MODULES: dict[str, tuple[int, list[int]]] = {
    "qkv": (4096, [4096, 1024, 1024]),
    "o": (4096, [4096]),
    "gate_up": (4096, [14336, 14336]),
    "down": (14336, [4096]),
}
RANKS = {"8": (8,), "16": (16,), "64": (64,), "mixed": (8, 16, 32, 64)}
L2_DEFEAT_BYTES = 256 << 20  # distinct weights per replay: several times an H100's 50 MB L2
DTYPE = torch.bfloat16
DEVICE = "cuda"


@dataclass(frozen=True)
class Scenario:
    phase: str  # "decode" (BGMV) or "prefill" (SGMV)
    num_tokens: int
    num_adapters: int
    rank_setting: str

    @property
    def num_requests(self) -> int:
        return self.num_tokens if self.phase == "decode" else max(32, self.num_adapters)


@dataclass
class Result:
    scenario: Scenario
    must_read_mb: float
    active: int = 0  # adapters that have tokens in the batch
    times_us: dict[str, float] = field(default_factory=dict)
    modes: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Layer:
    """One layer's adapters, slot-pool layout (see kvrun.punica.ref)."""

    lora_a: dict[str, list[torch.Tensor]]
    lora_b: dict[str, list[torch.Tensor]]
    ranks: dict[str, torch.Tensor]
    scalings: dict[str, torch.Tensor]  # per module: [num_slices, num_slots]


@dataclass
class Batch:
    x: dict[str, torch.Tensor]  # per module: [num_tokens, in_features]
    out: dict[str, torch.Tensor]  # per module: [num_tokens, sum(out_features)]
    shrunk: dict[str, torch.Tensor]  # per module: [num_slices, num_tokens, max_rank] fp32 (kvrun: split-K)
    shrunk_bf16: dict[str, torch.Tensor]  # the same in bf16 (torch loop)
    token_slots: torch.Tensor  # [num_tokens] int32
    seg_indptr: torch.Tensor  # [num_requests + 1] int32
    seg_slots: torch.Tensor  # [num_requests] int32
    request_slots: list[int]


def slot_ranks(rank_setting: str, num_slots: int) -> list[int]:
    choices = RANKS[rank_setting]
    return [choices[slot % len(choices)] for slot in range(num_slots)]


def make_layer(num_slots: int, rank_setting: str) -> Layer:
    max_rank = max(RANKS[rank_setting])
    ranks = torch.tensor(slot_ranks(rank_setting, num_slots), dtype=torch.int32, device=DEVICE)
    # Scaling 1: flashinfer's segment GEMM has none, and then all three paths compute the same numbers.
    layer = Layer({}, {}, {}, {})
    for name, (in_features, outs) in MODULES.items():
        layer.lora_a[name] = [
            torch.randn(num_slots, max_rank, in_features, device=DEVICE, dtype=DTYPE) * 0.02 for _ in outs
        ]
        layer.lora_b[name] = [torch.randn(num_slots, max_rank, n, device=DEVICE, dtype=DTYPE) * 0.02 for n in outs]
        layer.ranks[name] = ranks.repeat(len(outs), 1).contiguous()
        layer.scalings[name] = torch.ones(len(outs), num_slots, device=DEVICE)
    return layer


def make_batch(scenario: Scenario, generator: torch.Generator) -> Batch:
    requests = scenario.num_requests
    request_slots = [i % scenario.num_adapters for i in range(requests)]
    order = torch.randperm(requests, generator=generator).tolist()
    request_slots = [request_slots[i] for i in order]
    base_length, extra = divmod(scenario.num_tokens, requests)
    lengths = [base_length + (1 if i < extra else 0) for i in range(requests)]
    if scenario.phase == "prefill":  # SGMV wants each adapter's requests side by side
        paired = sorted(zip(request_slots, lengths, strict=True))
        request_slots, lengths = [s for s, _ in paired], [n for _, n in paired]
    token_slots = torch.repeat_interleave(torch.tensor(request_slots, dtype=torch.int32), torch.tensor(lengths))
    seg_indptr = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    max_rank = max(RANKS[scenario.rank_setting])
    tokens = scenario.num_tokens
    return Batch(
        x={n: torch.randn(tokens, i, device=DEVICE, dtype=DTYPE) for n, (i, _) in MODULES.items()},
        out={n: torch.zeros(tokens, sum(o), device=DEVICE, dtype=DTYPE) for n, (_, o) in MODULES.items()},
        shrunk={n: torch.zeros(len(o), tokens, max_rank, device=DEVICE) for n, (_, o) in MODULES.items()},
        shrunk_bf16={
            n: torch.zeros(len(o), tokens, max_rank, device=DEVICE, dtype=DTYPE) for n, (_, o) in MODULES.items()
        },
        token_slots=token_slots.to(DEVICE),
        seg_indptr=seg_indptr.to(DEVICE),
        seg_slots=torch.tensor(request_slots, dtype=torch.int32, device=DEVICE),
        request_slots=request_slots,
    )


def must_read_bytes(scenario: Scenario, batch: Batch) -> int:
    active = set(batch.request_slots)
    ranks = slot_ranks(scenario.rank_setting, scenario.num_adapters)
    element = torch.finfo(DTYPE).bits // 8
    total = 0
    for in_features, outs in MODULES.values():
        total += sum(ranks[s] for s in active) * len(outs) * in_features * element  # A
        total += sum(ranks[s] for s in active) * sum(outs) * element  # B
        total += scenario.num_tokens * (in_features + 2 * sum(outs)) * element  # x read, out read + written
    return total


# ---- the three implementations: each returns step(layer) running one layer's LoRA ----


def kvrun_step(scenario: Scenario, batch: Batch, meta: LoRAKernelMeta | None) -> Callable[[Layer], None]:
    import kvrun.punica.triton as kernels

    if scenario.phase == "decode":
        groups = meta.group_tokens(batch.token_slots)  # once per step in an engine; timed separately
    else:
        groups = SlotGroups.from_segments(batch.seg_indptr, batch.seg_slots)

    def step(layer: Layer) -> None:
        for name, (_, outs) in MODULES.items():
            kernels.shrink(
                batch.x[name], layer.lora_a[name], groups, layer.ranks[name], layer.scalings[name], batch.shrunk[name]
            )
            kernels.expand(
                batch.shrunk[name], layer.lora_b[name], groups, layer.ranks[name], batch.out[name], offsets(outs)
            )

    return step


def torch_step(scenario: Scenario, batch: Batch) -> Callable[[Layer], None]:
    """kvrun.punica.ref: gather + bmm per token for decode, a Python loop over segments for prefill."""
    ops = REFERENCE_OPS
    decode = scenario.phase == "decode"
    rows = (batch.token_slots,) if decode else (batch.seg_indptr, batch.seg_slots)
    shrink, expand = (ops.bgmv_shrink, ops.bgmv_expand) if decode else (ops.sgmv_shrink, ops.sgmv_expand)

    def step(layer: Layer) -> None:
        for name, (_, outs) in MODULES.items():
            y = batch.shrunk_bf16[name]
            shrink(batch.x[name], layer.lora_a[name], *rows, layer.ranks[name], layer.scalings[name], y)
            expand(y, layer.lora_b[name], *rows, layer.ranks[name], batch.out[name], offsets(outs))

    return step


def flashinfer_step(scenario: Scenario, batch: Batch, wrapper) -> Callable[[Layer], None]:
    # Segments of one adapter each, tokens gathered into that order (decode batches arrive unsorted).
    order = torch.argsort(batch.token_slots.cpu(), stable=True)
    sorted_slots = batch.token_slots.cpu()[order]
    adapters, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
    seg_indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(DEVICE)
    weight_indices = adapters.to(torch.int64).to(DEVICE)
    order = order.to(DEVICE)
    num_segments = adapters.numel()

    def step(layer: Layer) -> None:
        for name, (_, outs) in MODULES.items():
            x = batch.x[name][order]
            for i, (a, b) in enumerate(zip(layer.lora_a[name], layer.lora_b[name], strict=True)):
                y = wrapper.run(x, a, num_segments, True, seg_indptr=seg_indptr, weight_indices=weight_indices)
                delta = wrapper.run(y, b, num_segments, False, seg_indptr=seg_indptr, weight_indices=weight_indices)
                start = offsets(outs)[i]
                batch.out[name][order, start : start + outs[i]] += delta

    return step


def check_agreement(
    step: Callable[[Layer], None], reference: Callable[[Layer], None], layer: Layer, batch: Batch
) -> str:
    """Run both on one layer from zeroed outputs; '' when they agree within bf16 tolerance (see the GPU test)."""
    results = []
    for run in (step, reference):
        for out in batch.out.values():
            out.zero_()
        run(layer)
        results.append({name: out.float().clone() for name, out in batch.out.items()})
    for name, expected in results[1].items():
        error = (results[0][name] - expected).abs().max().item()
        if error > 2**-6 * max(expected.abs().max().item(), 1e-6):
            return f"MISMATCH vs torch on {name}: max error {error:.3g}"
    return ""


def offsets(outs: list[int]) -> list[int]:
    return [sum(outs[:i]) for i in range(len(outs))]


# ---- timing ----


def measure(step: Callable[[Layer], None], layers: list[Layer], iterations: int, graph: bool) -> tuple[float, str]:
    """-> (microseconds per layer, "graph" | "eager"). Eager paths are bound by Python and host syncs, not by L2,
    so they run one layer copy a few times."""
    if not graph:
        layers, iterations = layers[:1], min(iterations, 3)

    def run_all() -> None:
        for layer in layers:
            step(layer)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run_all()  # compiles / JITs and warms allocators outside any capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    replay = run_all
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            run_all()
        replay = captured.replay
    replay()
    return _event_time_us(replay, iterations) / len(layers), "graph" if graph else "eager"


def _event_time_us(function: Callable[[], None], iterations: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iterations


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted)."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    return 2 * source.numel() / (_event_time_us(lambda: target.copy_(source), 10) * 1e-6)


def grouping_time_us(num_tokens: int, num_slots: int) -> float:
    meta = LoRAKernelMeta(num_tokens, num_slots, DEVICE)
    token_slots = torch.randint(0, num_slots, (num_tokens,), dtype=torch.int32, device=DEVICE)
    meta.group_tokens(token_slots)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        meta.group_tokens(token_slots)
    graph.replay()
    return _event_time_us(graph.replay, 50)


# ---- driver ----


def scenarios(quick: bool) -> list[Scenario]:
    adapters = [1, 32, 128] if quick else [1, 8, 32, 128]
    ranks = ["16", "mixed"] if quick else list(RANKS)
    decode_tokens = [32] if quick else [32, 128]
    found = [Scenario("decode", t, a, r) for t in decode_tokens for a in adapters for r in ranks]
    found += [Scenario("prefill", 2048, a, r) for a in adapters for r in ranks]
    return found


def layer_copies(scenario: Scenario) -> list[Layer]:
    max_rank = max(RANKS[scenario.rank_setting])
    per_layer = scenario.num_adapters * max_rank * sum(i * len(o) + sum(o) for i, o in MODULES.values()) * 2
    count = max(1, min(32, math.ceil(L2_DEFEAT_BYTES / per_layer)))
    return [make_layer(scenario.num_adapters, scenario.rank_setting) for _ in range(count)]


def run_pass(results: list[Result], names: list[str], iterations: int, bandwidth: float, make_step, deadline) -> None:
    generator = torch.Generator().manual_seed(0)
    for result in results:
        scenario = result.scenario
        if time.monotonic() > deadline:
            result.notes.append(f"{'/'.join(names)}: skipped (time budget)")
            continue
        layers = layer_copies(scenario)
        batch = make_batch(scenario, generator)
        result.must_read_mb = must_read_bytes(scenario, batch) / 1e6
        result.active = len(set(batch.request_slots))
        for name in names:
            step, graph = make_step(name, scenario, batch)
            mismatch = check_agreement(step, torch_step(scenario, batch), layers[0], batch) if name != "torch" else ""
            if mismatch:
                result.notes.append(f"{name}: {mismatch}")
            try:
                result.times_us[name], result.modes[name] = measure(step, layers, iterations, graph)
            except Exception as error:  # one failing path must not lose the other columns
                result.notes.append(f"{name}: {type(error).__name__}: {str(error)[:120]}")
                if graph:  # e.g. a host sync inside capture: retry without the graph
                    try:
                        result.times_us[name], result.modes[name] = measure(step, layers, iterations, False)
                    except Exception as retry_error:
                        result.notes.append(f"{name} eager: {type(retry_error).__name__}")
        print(format_row(result, bandwidth), flush=True)
        del layers, batch
        torch.cuda.empty_cache()


def kernel_breakdown(bandwidth: float, iterations: int) -> list[str]:
    """Each kernel of the headline case (decode, 32 tokens, 32 adapters, r16) alone: where a layer's time goes."""
    import kvrun.punica.triton as kernels

    scenario = Scenario("decode", 32, 32, "16")
    layers = layer_copies(scenario)
    batch = make_batch(scenario, torch.Generator().manual_seed(0))
    groups = LoRAKernelMeta(scenario.num_tokens, scenario.num_adapters, DEVICE).group_tokens(batch.token_slots)
    element, rank, tokens = 2, 16, scenario.num_tokens
    lines = ["kernel          us   must-read MB   % copy BW"]
    for name, (in_features, outs) in MODULES.items():

        def shrink(layer: Layer, name=name) -> None:
            kernels.shrink(
                batch.x[name], layer.lora_a[name], groups, layer.ranks[name], layer.scalings[name], batch.shrunk[name]
            )

        def expand(layer: Layer, name=name, outs=outs) -> None:
            kernels.expand(
                batch.shrunk[name], layer.lora_b[name], groups, layer.ranks[name], batch.out[name], offsets(outs)
            )

        shrink_bytes = (32 * rank * len(outs) + tokens) * in_features * element
        expand_bytes = (32 * rank + 2 * tokens) * sum(outs) * element
        for kind, step, size in (("shrink", shrink, shrink_bytes), ("expand", expand, expand_bytes)):
            micros, _ = measure(step, layers, iterations, graph=True)
            percent = size / (micros * 1e-6) / bandwidth * 100
            lines.append(f"{name + ' ' + kind:14s}{micros:6.1f} {size / 1e6:10.2f} {percent:9.1f}%")
    return lines


def format_row(result: Result, bandwidth: float) -> str:
    s = result.scenario
    cells = [
        f"{s.phase:7s}",
        f"{s.num_tokens:5d}",
        f"{s.num_adapters:4d}/{result.active:<4d}",
        f"{s.rank_setting:>5s}",
        f"{result.must_read_mb:8.1f}",
    ]
    for name in ("kvrun", "flashinfer", "torch"):
        t = result.times_us.get(name)
        if t is None:
            cells.append(f"{'-':>18s}")
            continue
        mark = "" if result.modes.get(name) == "graph" else "*"
        cells.append(f"{t:9.1f}{mark:1s} {percent_of_copy(result, t, bandwidth):5.1f}%")
    return " | ".join(cells) + ("  " + "; ".join(result.notes) if result.notes else "")


def percent_of_copy(result: Result, micros: float, bandwidth: float) -> float:
    return result.must_read_mb * 1e6 / (micros * 1e-6) / bandwidth * 100


HEADER = (
    "phase   | tokens | slots/active | rank | must-read MB/layer | kvrun us/layer  %copyBW | flashinfer | torch loop\n"
    "(* = eager: that path syncs with the host or could not be captured)"
)


def write_markdown(path: Path, results: list[Result], bandwidth: float, extras: dict) -> None:
    lines = [
        f"# LoRA kernels, {extras['device']}, {extras['date']}",
        "",
        f"Copy bandwidth {bandwidth / 1e12:.2f} TB/s. Decode grouping, once per step: {extras['grouping_us']} us.",
        "",
        "| phase | tokens | slots | active | rank | must-read MB | kvrun us | kvrun %BW | flashinfer us"
        " | flashinfer %BW | torch us | torch %BW | notes |",
        "|" + "---|" * 13,
    ]
    for r in results:
        s = r.scenario
        cells = [s.phase, s.num_tokens, s.num_adapters, r.active, s.rank_setting, f"{r.must_read_mb:.1f}"]
        for name in ("kvrun", "flashinfer", "torch"):
            t = r.times_us.get(name)
            mark = "" if r.modes.get(name) == "graph" else " (eager)"
            cells += ["-", "-"] if t is None else [f"{t:.1f}{mark}", f"{percent_of_copy(r, t, bandwidth):.1f}"]
        cells.append("; ".join(r.notes))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        "Headline case, kernel by kernel (decode, 32 tokens, 32 adapters, r16):",
        "",
        "```",
        *extras["breakdown"],
        "```",
    ]
    path.write_text("\n".join(lines) + "\n")


def flashinfer_wrapper():
    try:
        from flashinfer.gemm import SegmentGEMMWrapper
    except ImportError as error:
        print(f"flashinfer unavailable ({error}); skipping its column")
        return None
    return SegmentGEMMWrapper(torch.empty(128 << 20, dtype=torch.int8, device=DEVICE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the results as a markdown file")
    parser.add_argument("--quick", action="store_true", help="fewer scenarios")
    parser.add_argument("--flashinfer", choices=["auto", "off"], default="auto")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=200.0, help="kvrun/torch pass: no new scenario after")
    parser.add_argument("--flashinfer-budget-s", type=float, default=150.0, help="flashinfer pass, JIT included")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    torch.manual_seed(0)
    started = time.monotonic()
    bandwidth = copy_bandwidth()
    extras = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"))
    extras["grouping_us"] = {t: round(grouping_time_us(t, 128), 1) for t in (32, 128)}
    print(f"{extras['device']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"decode grouping (sort tokens by slot, once per step, 128 slots): {extras['grouping_us']} us")
    try:
        extras["breakdown"] = kernel_breakdown(bandwidth, args.iterations)
    except Exception as error:  # the main table matters more
        extras["breakdown"] = [f"breakdown failed: {type(error).__name__}: {error}"]
    print("\n".join(extras["breakdown"]))

    results = [Result(scenario, 0.0) for scenario in scenarios(args.quick)]
    print(HEADER)

    def local_step(name: str, scenario: Scenario, batch: Batch):
        if name == "kvrun":
            meta = LoRAKernelMeta(scenario.num_tokens, scenario.num_adapters, DEVICE)
            return kvrun_step(scenario, batch, meta), True
        return torch_step(scenario, batch), scenario.phase == "decode"  # the SGMV loop reads segment bounds

    run_pass(results, ["kvrun", "torch"], args.iterations, bandwidth, local_step, started + args.budget_s)
    if args.out:
        write_markdown(args.out, results, bandwidth, extras)

    wrapper = None if args.flashinfer == "off" else flashinfer_wrapper()
    if wrapper is not None:
        chosen = [r for r in results if r.scenario.rank_setting in ("16", "64") and r.times_us]
        print("flashinfer segment_gemm, uniform ranks only (the first call JIT-compiles, ~100 s):")
        run_pass(
            chosen,
            ["flashinfer"],
            args.iterations,
            bandwidth,
            lambda name, scenario, batch: (flashinfer_step(scenario, batch, wrapper), True),
            time.monotonic() + args.flashinfer_budget_s,
        )
        print(HEADER)
        for result in results:
            print(format_row(result, bandwidth))
        if args.out:
            write_markdown(args.out, results, bandwidth, extras)
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
