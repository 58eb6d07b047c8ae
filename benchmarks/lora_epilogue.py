"""What PEFT's lora_bias and DoRA cost in the LoRA kernels, against plain LoRA, at Llama-3-8B shapes.

One decoder layer's LoRA work (shrink + expand for qkv, o, gate_up and down; see lora_kernels.py for the method: CUDA
graph replays over enough layer copies to defeat L2), the same batch three times: every slot plain LoRA (no
epilogue), every slot lora_bias (the expand adds a per-feature shift), every slot DoRA (a per-feature scale and
shift). Decode batches of 32 and 128 tokens and a 2048-token prefill, over 8 and 32 adapters at r=16.

Usage on the GPU host:  python3 benchmarks/lora_epilogue.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root

from benchmarks.lora_kernels import (  # noqa: E402
    DEVICE, MODULES, Scenario, layer_copies, make_batch, measure, offsets,
)  # fmt: skip
from kvrun.punica.metadata import LoRAKernelMeta, SlotGroups  # noqa: E402
from kvrun.punica.ref import PLAIN, SCALE_SHIFT, SHIFT, ExpandEpilogue  # noqa: E402

KINDS = {"plain LoRA": PLAIN, "lora_bias": SHIFT, "DoRA": SCALE_SHIFT}
ITERATIONS = 20


def epilogues(num_slots: int, mode: int) -> dict[str, ExpandEpilogue]:
    """One epilogue per module, every slot in `mode`."""
    tables = {}
    for name, (_, outs) in MODULES.items():
        modes = torch.full((len(outs), num_slots), mode, dtype=torch.int32, device=DEVICE)
        scale = [1 + 0.01 * torch.randn(num_slots, n, device=DEVICE) for n in outs]
        shift = [0.01 * torch.randn(num_slots, n, device=DEVICE, dtype=torch.bfloat16) for n in outs]
        tables[name] = ExpandEpilogue(modes, scale, shift)
    return tables


def step_for(scenario: Scenario, batch, mode: int):
    import kvrun.punica.triton as kernels

    if scenario.phase == "decode":
        groups = LoRAKernelMeta(scenario.num_tokens, scenario.num_adapters, DEVICE).group_tokens(batch.token_slots)
    else:
        groups = SlotGroups.from_segments(batch.seg_indptr, batch.seg_slots)
    tables = epilogues(scenario.num_adapters, mode) if mode != PLAIN else {}

    def step(layer) -> None:
        for name, (_, outs) in MODULES.items():
            kernels.shrink(
                batch.x[name], layer.lora_a[name], groups, layer.ranks[name], layer.scalings[name], batch.shrunk[name]
            )
            kernels.expand(batch.shrunk[name], layer.lora_b[name], groups, layer.ranks[name], batch.out[name],
                           offsets(outs), tables.get(name))  # fmt: skip

    return step


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, bf16, one Llama-3-8B layer's LoRA (shrink + expand, 4 modules), r=16")
    print("| phase | tokens | adapters | " + " | ".join(f"{kind} us" for kind in KINDS) + " | DoRA / plain |")
    print("|---|---|---|" + "---|" * (len(KINDS) + 1))
    cases = [Scenario("decode", t, a, "16") for t in (32, 128) for a in (8, 32)]
    cases += [Scenario("prefill", 2048, a, "16") for a in (8, 32)]
    for scenario in cases:
        layers = layer_copies(scenario)
        batch = make_batch(scenario, generator)
        times = {}
        for kind, mode in KINDS.items():
            times[kind], _ = measure(step_for(scenario, batch, mode), layers, ITERATIONS, graph=True)
        cells = " | ".join(f"{times[kind]:.1f}" for kind in KINDS)
        ratio = times["DoRA"] / times["plain LoRA"]
        row = f"| {scenario.phase} | {scenario.num_tokens} | {scenario.num_adapters} | {cells} | {ratio:.2f} |"
        print(row, flush=True)
        del layers, batch
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
