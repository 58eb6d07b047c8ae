"""Tensor parallelism on one host with two or more GPUs: TP=N against TP=1, printed as one table.

Rows (each case runs in its own process, so every engine starts on empty cards):
  agreement   greedy tokens of TP=N vs TP=1 on a tiny random Llama (bf16), base rows and mixed r8/r16 adapters
  decode      tok/s and ms per decode step on Llama-3-8B shapes (random bf16 weights), batch 32 and 128, with no
              LoRA and with 32 distinct r16 all-linear adapters, TP=1 and TP=N
  collectives the all-reduces and the logits all-gather of one decode step on the model's own group: eager, and
              replayed from a CUDA graph (as the captured decode step runs them)
  70B         a Llama-3-70B-shaped model (same per-layer shapes, fewer layers) on TP=N: weights and KV cache per GPU
              from the memory plan, each GPU's used memory (nvidia-smi), and decode tok/s at batch 32

    python benchmarks/tensor_parallel.py                    # the full run (about 10 minutes on 2x H100)
    python benchmarks/tensor_parallel.py --quick            # small shapes and few tokens: a smoke test
    python benchmarks/tensor_parallel.py --no-cuda-graphs   # eager decode on every rank
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_e2e import LLAMA3_8B, decode_run, random_adapters  # noqa: E402

LLAMA3_70B_LAYER = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                    "num_key_value_heads": 8}  # fmt: skip
TINY = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # fmt: skip


def write_checkpoint(config: dict, path: Path, seed: int = 0) -> Path:
    """A random checkpoint with real weights (agreement needs the same weights on both engines)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config))
    with torch.no_grad():  # wide weights: logits far from ties, so bf16 rounding rarely decides a token
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.05)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    return path


def start(model_dir: Path, tp: int, args, max_loras: int, **extra):
    from kvrun import LLM

    settings = dict(dtype="bfloat16", max_loras=max_loras, max_lora_rank=args.rank, max_cpu_loras=max(max_loras, 1),
                    max_num_seqs=max(args.batch), max_num_batched_tokens=8192, tensor_parallel_size=tp,
                    cuda_graphs=not args.no_cuda_graphs)  # fmt: skip
    return LLM(str(model_dir), **{**settings, **extra})


def add_adapters(llm, count: int, rank: int) -> list[str]:
    manager = llm.engine.adapters
    for parsed in random_adapters(count, rank, llm.engine.model_config, torch.bfloat16, "cuda"):
        manager.add(parsed, lambda parsed=parsed: parsed)
    return list(manager.names())


def stop(llm) -> None:
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


# -- cases (each in its own process) ------------------------------------------------------------------------------
def case_agreement(args, tmp: Path) -> list[dict]:
    from kvrun import SamplingParams

    model_dir = write_checkpoint(TINY, tmp / "tiny")
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 4000, (8 + 5 * index,), generator=generator).tolist() for index in range(16)]
    params = SamplingParams(max_tokens=args.agreement_tokens, temperature=0.0, ignore_eos=True)
    results = {}
    for tp in (1, args.tp):
        llm = start(model_dir, tp, args, max_loras=4, num_blocks=1024, max_num_seqs=16)
        names = add_adapters(llm, 2, 8) + add_adapters_ranked(llm, 2, 16)
        adapters = [None if index % 5 == 0 else names[index % len(names)] for index in range(len(prompts))]
        results[tp] = [output.token_ids for output in llm.generate(prompts, params, adapters=adapters)]
        stop(llm)
    same_tokens = total = exact = 0
    for one, many in zip(results[1], results[args.tp]):
        prefix = next((index for index, (a, b) in enumerate(zip(one, many)) if a != b), len(one))
        same_tokens, total, exact = same_tokens + prefix, total + len(one), exact + (prefix == len(one))
    note = f"{exact}/{len(prompts)} rows identical; tokens before the first difference: {same_tokens}/{total}"
    return [dict(what=f"greedy agreement TP={args.tp} vs TP=1 (tiny, bf16)", batch=str(len(prompts)),
                 value=f"{same_tokens / total:.3f}", unit="token agreement", note=note)]  # fmt: skip


def add_adapters_ranked(llm, count: int, rank: int) -> list[str]:
    """More adapters of another rank under new names (random_adapters names them bench-<index>)."""
    from kvrun.adapters.peft_format import ParsedAdapter
    from kvrun.adapters.ref import AdapterRef

    manager = llm.engine.adapters
    names = []
    for index, parsed in enumerate(random_adapters(count, rank, llm.engine.model_config, torch.bfloat16, "cuda", 7)):
        ref = AdapterRef(f"bench-r{rank}-{index}", 1, f"{rank:032x}{index:032x}", rank, 2.0 * rank,
                         parsed.ref.target_modules)  # fmt: skip
        renamed = ParsedAdapter(ref, parsed.weights)
        manager.add(renamed, lambda renamed=renamed: renamed)
        names.append(ref.name)
    return names


def case_decode(args, tmp: Path, tp: int) -> list[dict]:
    model_dir = tmp / "llama3-8b"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(shrunk(LLAMA3_8B, args)))
    rows = []
    for count in (0, args.adapters):
        llm = start(model_dir, tp, args, max_loras=count, load_format="dummy", kv_cache_memory_bytes=args.kv_gib << 30)
        names = add_adapters(llm, count, args.rank) if count else [None]
        for batch in args.batch:
            rate, step_ms = decode_run(llm, batch, args.prompt, args.new_tokens, names)
            what = f"decode TP={tp}, " + (f"{count} distinct r{args.rank} adapters" if count else "no LoRA")
            rows.append(dict(what=what, batch=str(batch), value=f"{rate:.0f}", unit="tok/s", note=f"{step_ms:.2f} ms/step"))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # survives a later crash
        if tp > 1 and count == 0:
            rows += collective_rows(llm, args)
        stop(llm)
    return rows


def collective_rows(llm, args) -> list[dict]:
    runner = llm.engine.runner
    rows = []
    for batch in args.batch:
        eager, graphed = runner.call_everywhere(time_collectives, batch, 20)
        calls = 2 * runner.model_config.num_layers + 1
        note = f"{calls} all-reduces of [{batch}, {runner.model_config.hidden_size}] + logits all-gather"
        rows.append(dict(what=f"collectives of one decode step, TP={runner.tp.size}, eager", batch=str(batch),
                         value=f"{eager:.3f}", unit="ms/step", note=note))  # fmt: skip
        rows.append(dict(what=f"collectives of one decode step, TP={runner.tp.size}, CUDA graph", batch=str(batch),
                         value=f"{graphed:.3f}", unit="ms/step", note=note))  # fmt: skip
    return rows


def time_collectives(runner, rows: int, iterations: int) -> tuple[float, float]:
    """ms of the collectives one decode step of `rows` rows makes (run on every rank at once)."""
    tp, config = runner.tp, runner.model_config
    hidden = torch.randn(rows, config.hidden_size, dtype=runner.dtype, device=runner.device)
    logits = torch.randn(rows, -(-config.vocab_size // tp.size), dtype=runner.dtype, device=runner.device)

    def step() -> None:
        for _ in range(2 * config.num_layers + 1):  # attention and MLP outputs of every layer, the embedding
            tp.all_reduce(hidden)
        tp.all_gather(logits)

    def timed(run) -> float:
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(iterations):
            run()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / iterations

    eager = timed(step)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return eager, timed(graph.replay)


def case_70b(args, tmp: Path) -> list[dict]:
    config = {**LLAMA3_70B_LAYER, "num_hidden_layers": args.layers_70b}
    model_dir = tmp / "llama3-70b-shaped"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config))
    llm = start(model_dir, args.tp, args, max_loras=0, load_format="dummy", max_num_seqs=32)
    plan = llm.engine.memory_plan
    used = nvidia_smi_used()
    rate, step_ms = decode_run(llm, 32, args.prompt, args.new_tokens, [None])
    params = sum(param.numel() for param in llm.engine.runner.model.parameters())
    rows = [dict(what=f"70B-shaped, {args.layers_70b} layers, TP={args.tp}: weights per GPU (plan)", batch="-",
                 value=f"{plan.weights / 2**30:.1f}" if plan else "-", unit="GiB",
                 note=f"rank 0 holds {params / 1e9:.2f} B parameters; one GPU would need "
                      f"{params * args.tp * 2 / 2**30:.0f} GiB for the weights alone"),
            dict(what=f"70B-shaped, {args.layers_70b} layers, TP={args.tp}: KV cache per GPU (plan)", batch="-",
                 value=f"{plan.kv_cache / 2**30:.1f}" if plan else "-", unit="GiB",
                 note=f"{llm.engine.blocks.num_blocks} blocks of {llm.engine.blocks.block_size} tokens"),
            dict(what=f"70B-shaped, {args.layers_70b} layers, TP={args.tp}: used per GPU (nvidia-smi)", batch="-",
                 value=" / ".join(f"{mib / 1024:.1f}" for mib in used), unit="GiB", note="GPU 0 / GPU 1 / ..."),
            dict(what=f"70B-shaped decode TP={args.tp}, no LoRA", batch="32", value=f"{rate:.0f}", unit="tok/s",
                 note=f"{step_ms:.2f} ms/step")]  # fmt: skip
    stop(llm)
    return rows


def nvidia_smi_used() -> list[int]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout  # fmt: skip
        return [int(line) for line in out.split() if line.strip().isdigit()]
    except (OSError, subprocess.SubprocessError):
        return []


def shrunk(config: dict, args) -> dict:
    return {**config, "num_hidden_layers": 4} if args.quick else config


# -- driver -------------------------------------------------------------------------------------------------------
def run_case(name: str, argv: list[str]) -> list[dict]:
    """Run one case in a fresh process; its rows come back as the JSON on its last stdout line."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--case", name, *argv], stdout=subprocess.PIPE, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("ROWS ")]
    if done.returncode != 0 or not lines:
        return [dict(what=f"{name}: FAILED (exit code {done.returncode}, see the log above)", batch="-", value="-",
                     unit="-", note="")]  # fmt: skip
    rows = json.loads(lines[-1][5:])
    print(f"{name}: {len(rows)} rows in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4-layer 8B shapes, few tokens, 4-layer 70B shapes")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--agreement-tokens", type=int, default=32)
    parser.add_argument("--kv-gib", type=int, default=8, help="KV cache per GPU for the decode runs")
    parser.add_argument("--layers-70b", type=int, default=40, help="layers of the 70B-shaped model (80 in the real one)")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.agreement_tokens, args.layers_70b = 16, 16, min(args.layers_70b, 4)

    if args.case is not None:
        with tempfile.TemporaryDirectory() as tmp:
            cases = {"agreement": lambda: case_agreement(args, Path(tmp)),
                     "decode-tp1": lambda: case_decode(args, Path(tmp), 1),
                     "decode-tpN": lambda: case_decode(args, Path(tmp), args.tp),
                     "70b": lambda: case_70b(args, Path(tmp))}  # fmt: skip
            print("ROWS " + json.dumps(cases[args.case]()), flush=True)
        return

    if torch.cuda.device_count() < args.tp:
        sys.exit(f"tensor_parallel.py: --tp {args.tp} needs {args.tp} GPUs, {torch.cuda.device_count()} visible")
    rows = []
    for name in ("agreement", "decode-tp1", "decode-tpN", "70b"):
        rows += run_case(name, sys.argv[1:])  # a case process writes nothing to --out
    shapes = "4-layer Llama-3-8B shapes" if args.quick else "Llama-3-8B shapes"
    lines = [f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}, {shapes}, bf16, prompt {args.prompt}, "
             f"{args.new_tokens} new tokens, CUDA graphs {'off' if args.no_cuda_graphs else 'on'}, "
             f"{time.strftime('%Y-%m-%d')}",
             "", "| what | batch | value | unit | note |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {row['what']} | {row['batch']} | {row['value']} | {row['unit']} | {row['note']} |" for row in rows]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
