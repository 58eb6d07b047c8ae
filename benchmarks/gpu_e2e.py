"""End-to-end decode throughput on a Llama-3-8B-shaped model (random bf16 weights), kvrun vs HF (+ PEFT).

Runs on a CUDA host. Every number in one run, printed as one table (and written as markdown to --out):
  copy bandwidth; kvrun base only; kvrun with N distinct r16 adapters on q,k,v,o,gate,up,down; HF transformers base;
  HF + PEFT with adapter_names (same adapter shapes); the per-step floor (bytes that must be read ÷ copy bandwidth);
  adapter cold load → first token; decode throughput when a batch needs more adapters than GPU slots.

    python benchmarks/gpu_e2e.py --batch 32 64 128 --new-tokens 64 --out $OUT/e2e.md
    python benchmarks/gpu_e2e.py --defaults --batch 32 128 --skip-hf --skip-extras --shrink-after-base-too
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROWS: list[tuple[str, str, float, float, str]] = []  # (what, batch, tok/s, ms/step, note)


def record(what: str, batch: str, rate: float, step_ms: float, note: str = "") -> None:
    ROWS.append((what, batch, rate, step_ms, note))
    print(f"| {what} | {batch} | {rate:.0f} | {step_ms:.2f} | {note} |", flush=True)  # survives a later crash
DEVICE = "cuda"


def copy_bandwidth() -> float:
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    del source, target
    return 2 * (1 << 30) / seconds  # bytes read + written per second


def random_adapters(count: int, rank: int, model_config, dtype, device, seed=0):
    """ParsedAdapters with random weights of real shapes (what a PEFT r16 all-linear checkpoint holds)."""
    from kvrun.adapters.peft_format import ParsedAdapter
    from kvrun.adapters.ref import AdapterRef
    from kvrun.runtime.models.manifest import lora_targets

    shapes = lora_targets(model_config).modules  # checkpoint module path → (in, out)
    generator = torch.Generator(device=device).manual_seed(seed)
    adapters = []
    for index in range(count):
        weights = {}
        for module, (in_features, out_features) in shapes.items():
            if module.rsplit(".", 1)[-1] not in TARGETS:
                continue
            a = torch.randn(rank, in_features, generator=generator, device=device, dtype=dtype) * 0.01
            b = torch.randn(out_features, rank, generator=generator, device=device, dtype=dtype) * 0.01
            weights[module] = (a, b)
        ref = AdapterRef(f"bench-{index}", 1, f"{index:064x}", rank, 2.0 * rank, TARGETS)
        adapters.append(ParsedAdapter(ref, weights))
    return adapters


def decode_run(llm, batch: int, prompt_len: int, new_tokens: int, adapters: list[str | None]):
    """Tokens/s and ms per decode step over the decode phase (prefill excluded)."""
    from kvrun import SamplingParams

    engine = llm.engine
    generator = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for row in range(batch):
        prompt = torch.randint(10, min(120000, engine.model_config.vocab_size), (prompt_len,), generator=generator).tolist()
        engine.add_request(prompt, params, adapters[row % len(adapters)])
    started: set[str] = set()
    while len(started) < batch:  # prefill everything first (in chunks: only a sampled token proves a row decodes)
        started.update(output.request_id for output in engine.step())
    torch.cuda.synchronize()
    steps, tokens, start = 0, 0, time.perf_counter()
    while engine.has_unfinished():
        tokens += len(engine.step())
        steps += 1
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return tokens / elapsed, 1e3 * elapsed / steps


def step_breakdown(llm, batch: int, args, adapters: list[str | None] = (None,), label: str = "") -> None:
    """Where a decode step's time goes: the captured graph alone vs the whole engine step (host work included)."""
    from kvrun import SamplingParams

    engine, runner = llm.engine, llm.engine.runner
    if runner.graphs is None:
        return
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for row in range(batch):
        engine.add_request(list(range(10 + row, 10 + row + args.prompt)), params, adapters[row % len(adapters)])
    while engine.num_waiting:
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        engine.step()
    step_ms = 1e3 * (time.perf_counter() - start) / 20
    bucket = runner.graphs.bucket_for(batch)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    uses_lora = any(adapter is not None for adapter in adapters)
    for _ in range(20):
        bucket.graphs[uses_lora].replay()
    end.record()
    torch.cuda.synchronize()
    replay_ms = begin.elapsed_time(end) / 20
    while engine.has_unfinished():
        engine.step()
    record(f"breakdown: whole engine step{label}", str(batch), 0.0, step_ms, "")
    record(f"breakdown: CUDA graph replay alone{label}", str(batch), 0.0, replay_ms, "GPU time of the captured forward")


def kvrun_runs(model_dir: Path, args, bandwidth: float) -> None:
    from kvrun import LLM
    from kvrun.adapters.layers import LinearWithLoRA

    runs = [("kvrun base only (no LoRA)", 0, True), ("kvrun", args.adapters, True)]
    if args.shrink_after_base_too:  # the baseline of the LoRA shrink on a side stream: captured after the base matmul
        runs.append(("kvrun", args.adapters, False))
    for label, max_loras, beside in runs:
        LinearWithLoRA.shrink_beside_base = beside
        suffix = "" if beside else " (shrink after the base matmul)"
        if args.defaults:  # what a user gets with no flags: the engine sizes KV, slots and batch from the card
            overrides = {**args.set, **({"max_loras": 0} if max_loras == 0 else {})}
            llm = LLM(str(model_dir), load_format="dummy", **overrides)
            label = f"{label} [defaults{''.join(f' {k}={v}' for k, v in args.set.items())}]"
        else:
            llm = LLM(str(model_dir), load_format="dummy", dtype="bfloat16", max_loras=max_loras,
                      max_lora_rank=args.rank, max_cpu_loras=max(args.adapters, 1) * 4, max_num_seqs=max(args.batch),
                      kv_cache_memory_bytes=args.kv_gib << 30, max_num_batched_tokens=8192)
        if max_loras == 0:
            step_breakdown(llm, args.batch[0], args)
            for batch in args.batch:
                rate, step_ms = decode_run(llm, batch, args.prompt, args.new_tokens, [None])
                record(label, str(batch), rate, step_ms, "")
        else:
            manager = llm.engine.adapters
            for parsed in random_adapters(args.adapters, args.rank, llm.engine.model_config, torch.bfloat16, DEVICE):
                manager.add(parsed, lambda parsed=parsed: parsed)
            names = list(manager.names())
            step_breakdown(llm, args.batch[0], args, names, f", {args.adapters} adapters{suffix}")
            for batch in args.batch:
                rate, step_ms = decode_run(llm, batch, args.prompt, args.new_tokens, [None])
                record(f"kvrun base rows (LoRA engine){suffix}", str(batch), rate, step_ms, "")
                rate, step_ms = decode_run(llm, batch, args.prompt, args.new_tokens, names)
                record(f"kvrun {args.adapters} distinct r{args.rank} adapters{suffix}", str(batch), rate, step_ms,
                             f"{min(batch, args.adapters)} adapters per step")
            if not args.skip_extras:
                cold_load(llm, args)
                slot_pressure(llm, args)
        floor_rows(llm, args, bandwidth)
        llm = manager = None  # the manager holds the model too: both go before the next engine
        gc.collect()
        torch.cuda.empty_cache()


def floor_rows(llm, args, bandwidth: float) -> None:
    if any(row[0].startswith("floor") for row in ROWS):
        return
    model = llm.engine.runner.model
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    config = llm.engine.model_config
    from kvrun.runtime.models.manifest import lora_targets

    adapter_bytes = sum(args.rank * (i + o) * 2 for m, (i, o) in lora_targets(config).modules.items()
                        if m.rsplit(".", 1)[-1] in TARGETS)  # fmt: skip
    kv_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2
    for batch in args.batch:
        kv = batch * (args.prompt + args.new_tokens // 2) * kv_token
        distinct = min(batch, args.adapters)
        base_ms = 1e3 * (weight_bytes + kv) / bandwidth
        lora_ms = 1e3 * (weight_bytes + kv + distinct * adapter_bytes) / bandwidth
        record("floor: base weights + KV", str(batch), batch * 1e3 / base_ms, base_ms,
                     f"{(weight_bytes + kv) / 1e9:.2f} GB/step")
        record(f"floor: + {distinct} adapters", str(batch), batch * 1e3 / lora_ms, lora_ms,
                     f"adapters {distinct * adapter_bytes / 1e9:.2f} GB/step")


def cold_load(llm, args) -> None:
    """A PEFT r16 all-linear checkpoint on disk → parsed, validated, in a slot → first token."""
    from safetensors.torch import save_file

    from kvrun import SamplingParams

    config = llm.engine.model_config
    parsed = random_adapters(1, args.rank, config, torch.bfloat16, "cpu", seed=99)[0]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        tensors = {}
        for module, (a, b) in parsed.weights.items():
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = b
        save_file(tensors, str(directory / "adapter_model.safetensors"))
        (directory / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": args.rank, "lora_alpha": 2 * args.rank, "target_modules": list(TARGETS)}))
        size = (directory / "adapter_model.safetensors").stat().st_size
        prompt = list(range(100, 100 + args.prompt))
        params = SamplingParams(max_tokens=1, temperature=0.0)
        llm.generate([prompt], params, adapters=["bench-0"])  # warm: resident adapter
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate([prompt], params, adapters=["bench-0"])
        warm_ms = 1e3 * (time.perf_counter() - start)
        start = time.perf_counter()
        llm.load_adapter("cold", directory)
        loaded = time.perf_counter()
        llm.generate([prompt], params, adapters=["cold"])
        torch.cuda.synchronize()
        done = time.perf_counter()
    record("cold adapter: load + validate", "1", 0.0, 1e3 * (loaded - start), f"{size / 1e6:.0f} MB safetensors")
    record("cold adapter: first token after load", "1", 0.0, 1e3 * (done - loaded),
                 f"resident adapter TTFT {warm_ms:.1f} ms")


def slot_pressure(llm, args) -> None:
    """Batch of 32 cycling over more distinct adapters than GPU slots: requests wait for slots, no failure."""
    manager = llm.engine.adapters
    extra = random_adapters(args.adapters * 3, args.rank, llm.engine.model_config, torch.bfloat16, "cpu", seed=7)
    for parsed in extra:
        renamed = type(parsed)(type(parsed.ref)(f"extra-{parsed.ref.name}", 1, parsed.ref.sha256, parsed.ref.rank,
                                                parsed.ref.alpha, parsed.ref.target_modules), parsed.weights)
        manager.add(renamed, lambda renamed=renamed: renamed)
    names = [name for name in manager.names() if name.startswith("extra-")]
    for distinct in (args.adapters // 2, args.adapters, 2 * args.adapters, 3 * args.adapters):
        start = time.perf_counter()
        rate, step_ms = decode_run(llm, 32, args.prompt, args.new_tokens, names[:distinct])
        record(f"kvrun {distinct} adapters, {args.adapters} GPU slots", "32", rate, step_ms,
                     f"host→slot loads included; wall {time.perf_counter() - start:.1f}s")


def hf_runs(model_dir: Path, args) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{k: v for k, v in LLAMA3_8B.items() if k not in ("architectures", "torch_dtype")})
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    batch = 32
    prompt = torch.randint(10, 120000, (batch, args.prompt), device="cuda")
    mask = torch.ones_like(prompt)

    def timed(model, new_tokens, **kwargs):
        with torch.no_grad():
            model.generate(input_ids=prompt[:, :8], attention_mask=mask[:, :8], max_new_tokens=2, **kwargs)
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, **kwargs)
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        return batch * new_tokens / elapsed, 1e3 * elapsed / new_tokens

    rate, step_ms = timed(model, args.new_tokens)
    record("HF transformers base", str(batch), rate, step_ms, "generate, prefill included")
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=list(TARGETS), init_lora_weights=False)
    peft = get_peft_model(model, lora, adapter_name="bench-0")
    for index in range(1, args.adapters):
        peft.add_adapter(f"bench-{index}", lora)
    peft.eval()  # PEFT refuses adapter_names in training mode
    names = [f"bench-{index % args.adapters}" for index in range(batch)]
    rate, step_ms = timed(peft, args.hf_peft_tokens, adapter_names=names)
    record(f"HF + PEFT, {args.adapters} adapters (adapter_names)", str(batch), rate, step_ms,
                 f"{args.hf_peft_tokens} new tokens, prefill included")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--hf-peft-tokens", type=int, default=8)
    parser.add_argument("--kv-gib", type=int, default=12)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-kvrun", action="store_true")
    parser.add_argument("--skip-extras", action="store_true", help="no cold-load or slot-pressure runs")
    parser.add_argument("--defaults", action="store_true", help="LLM(model) with no sizing arguments at all")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--shrink-after-base-too", action="store_true",
                        help="also the LoRA engine with each shrink captured after its base matmul, not beside it")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=INT",
                        help="with --defaults: integer LLM() arguments to set, e.g. max_num_batched_tokens=8192")
    args = parser.parse_args()
    args.set = {name: int(value) for name, value in (item.split("=", 1) for item in args.set)}

    bandwidth = copy_bandwidth()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        (model_dir / "config.json").write_text(json.dumps(LLAMA3_8B))
        if not args.skip_kvrun:
            kvrun_runs(model_dir, args, bandwidth)
        if not args.skip_hf:
            hf_runs(model_dir, args)
    lines = [f"{torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, Llama-3-8B shapes, bf16, "
             f"prompt {args.prompt}, {args.new_tokens} new tokens, r={args.rank}",
             "", "| what | batch | tok/s | ms/step | note |", "|---|---|---|---|---|"]
    lines += [f"| {what} | {batch} | {rate:.0f} | {ms:.2f} | {note} |" for what, batch, rate, ms, note in ROWS]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
