"""Decode cost of what adapters change in the vocabulary matrix, against plain LoRA in the same run: LoRA on the
output layer, trainable tokens on the embedding and output layer, and a whole copy of the output layer
(modules_to_save, whose steps run without CUDA graphs). Llama-3-8B shapes, random bf16 weights, every adapter r16 on
all seven projections plus its feature; one engine holds them all.

    python benchmarks/vocab_features.py --batch 32 128 --out $OUT/vocab.md

Rows: decode tok/s and ms per step for each kind of adapter (each row's batch cycles over --adapters distinct
adapters of that kind; the copy row has one adapter with a copy among plain ones, so every step of it runs eagerly).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root

from benchmarks.gpu_e2e import DEVICE, LLAMA3_8B, ROWS, decode_run, random_adapters, record  # noqa: E402

TRAINABLE_TOKENS = 64


def with_feature(parsed, kind: str, index: int, config):
    """parsed (a plain adapter) with the vocabulary feature `kind` added, renamed after it."""
    generator = torch.Generator(device=DEVICE).manual_seed(1000 + index)
    width, vocab, rank = config.hidden_size, config.vocab_size, parsed.ref.rank

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=DEVICE, dtype=torch.bfloat16) * 0.01

    extra = {}
    if kind == "lm_head LoRA":
        extra["weights"] = {**parsed.weights, "lm_head": (randn(rank, width), randn(vocab, rank))}
    elif kind == "trainable tokens":
        ids = tuple(range(index, vocab, vocab // TRAINABLE_TOKENS))[:TRAINABLE_TOKENS]
        extra["token_rows"] = {module: (ids, randn(len(ids), width)) for module in ("model.embed_tokens", "lm_head")}
    elif kind == "whole lm_head copy":
        extra["full_copies"] = {"lm_head": {"weight": randn(vocab, width)}}
    ref = dataclasses.replace(parsed.ref, name=f"{kind}-{index}", sha256=f"{hash((kind, index)) & (2**256 - 1):064x}")
    return dataclasses.replace(parsed, ref=ref, **extra)


def main() -> None:
    from kvrun import LLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--kv-gib", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    kinds = ["plain LoRA", "lm_head LoRA", "trainable tokens"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(LLAMA3_8B))
        llm = LLM(tmp, load_format="dummy", dtype="bfloat16", max_loras=args.adapters, max_lora_rank=args.rank,
                  max_cpu_loras=(len(kinds) + 1) * args.adapters, max_num_seqs=max(args.batch),
                  kv_cache_memory_bytes=args.kv_gib << 30, max_num_batched_tokens=8192,
                  max_trainable_tokens=TRAINABLE_TOKENS, max_full_module_slots=1)  # fmt: skip
        config, manager = llm.engine.model_config, llm.engine.adapters
        plain = random_adapters(args.adapters, args.rank, config, torch.bfloat16, DEVICE)
        names = {}
        for kind in [*kinds, "whole lm_head copy"]:
            for index, parsed in enumerate(plain[:1] if kind == "whole lm_head copy" else plain):
                adapter = parsed if kind == "plain LoRA" else with_feature(parsed, kind, index, config)
                manager.add(adapter, lambda adapter=adapter: adapter)
                names.setdefault(kind, []).append(adapter.ref.name)
        names["whole lm_head copy"] += names["plain LoRA"][1:]
        for served in names.values():  # warm-up, untimed: first-use work of every kind (slot writes, eager steps)
            decode_run(llm, min(args.batch), args.prompt, 4, served)
        for batch in args.batch:
            for kind, served in names.items():
                rate, step_ms = decode_run(llm, batch, args.prompt, args.new_tokens, served)
                note = "one of the adapters has a copy: every step eager" if kind == "whole lm_head copy" else ""
                record(f"{args.adapters} distinct r{args.rank} adapters: {kind}", str(batch), rate, step_ms, note)
    lines = [f"{torch.cuda.get_device_name()}, Llama-3-8B shapes, bf16, prompt {args.prompt}, {args.new_tokens} new "
             f"tokens, r={args.rank}, {TRAINABLE_TOKENS} trainable tokens per layer",
             "", "| what | batch | tok/s | ms/step | note |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {what} | {batch} | {rate:.0f} | {ms:.2f} | {note} |" for what, batch, rate, ms, note in ROWS]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
