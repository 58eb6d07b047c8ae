"""Push and pull an 84 MB adapter (Llama-3-8B shapes, r=16 on every linear, fp16) through the registry.

    .venv/bin/python benchmarks/registry_push_pull.py [--redis redis://127.0.0.1:6379/0] [--repeats 3]

Each repeat pushes cold (every chunk written), pulls into a fresh directory (every chunk read and its
sha256 checked), re-pushes the same bytes (deduplicated: chunks exist, only metadata is written), then
deletes the adapter so the next repeat starts cold again. Prints one table of medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters_registry import open_store
from adapters_registry.validate import read_adapter_dir, validate_adapter

HIDDEN, INTERMEDIATE, LAYERS, KV_HEADS, HEAD_DIM, RANK = 4096, 14336, 32, 8, 128, 16
PROJECTIONS = {  # module -> (submodule, in_features, out_features)
    "q_proj": ("self_attn", HIDDEN, HIDDEN),
    "k_proj": ("self_attn", HIDDEN, KV_HEADS * HEAD_DIM),
    "v_proj": ("self_attn", HIDDEN, KV_HEADS * HEAD_DIM),
    "o_proj": ("self_attn", HIDDEN, HIDDEN),
    "gate_proj": ("mlp", HIDDEN, INTERMEDIATE),
    "up_proj": ("mlp", HIDDEN, INTERMEDIATE),
    "down_proj": ("mlp", INTERMEDIATE, HIDDEN),
}


def build_adapter(directory: Path) -> int:
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(LAYERS):
        for module, (parent, in_features, out_features) in PROJECTIONS.items():
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(RANK, in_features, generator=generator) * 0.01).half()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_features, RANK, generator=generator) * 0.01).half()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 16, "lora_alpha": 32, "bias": "none", "base_model_name_or_path": '
        '"meta-llama/Meta-Llama-3-8B", "target_modules": ' + str(list(PROJECTIONS)).replace("'", '"') + "}"
    )
    return sum(path.stat().st_size for path in directory.iterdir())


def timed(function: Callable[..., object], *args: object) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def bench(url: str, source: Path, work: Path, repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {"push": [], "pull": [], "repush": []}
    with open_store(url, token="") as store:
        for repeat in range(repeats):
            name = f"bench/llama3-8b-r16-{uuid.uuid4().hex[:8]}"
            samples["push"].append(timed(store.push, source, name))
            samples["pull"].append(timed(store.pull, name, work / f"pull-{repeat}"))
            samples["repush"].append(timed(store.push, source, name))
            store.delete(name)
        if url.startswith("redis"):  # leave the shared Redis as we found it
            client, prefix = store.storage.redis, store.storage.keys.prefix
            leftovers = list(client.scan_iter(match=f"{prefix}*"))
            if leftovers:
                client.delete(*leftovers)
    return {key: statistics.median(values) for key, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis URL ('' to skip)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        source = work / "adapter"
        source.mkdir()
        size = build_adapter(source)
        files = read_adapter_dir(source)
        validate_s = statistics.median(timed(validate_adapter, files) for _ in range(args.repeats))
        backends = {"file": f"file://{work / 'registry'}"}
        if args.redis:
            separator = "&" if "?" in args.redis else "?"
            backends["redis"] = f"{args.redis}{separator}prefix=kvrun-bench-{uuid.uuid4().hex[:8]}:"
        megabytes = size / 1e6
        print(f"adapter: {megabytes:.1f} MB (Llama-3-8B shapes, r={RANK}, fp16); validation alone {validate_s:.2f} s")
        print(f"medians of {args.repeats} runs\n")
        print("| backend | push s | push MB/s | pull s | pull MB/s | dedup re-push s |")
        print("|---|---|---|---|---|---|")
        for backend, url in backends.items():
            result = bench(url, source, work, args.repeats)
            print(
                f"| {backend} | {result['push']:.2f} | {megabytes / result['push']:.0f} | {result['pull']:.2f} | "
                f"{megabytes / result['pull']:.0f} | {result['repush']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
