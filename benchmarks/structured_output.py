"""What structured output costs a decode step: the same batch with no row, one row and every row constrained.

Every row decodes from the same kind of prompt (sampled at temperature 0.8, seeded); a constrained row follows a
JSON schema whose language cannot end within the run (an array of at least 500 person objects), so the batch keeps
its size. After warm-up the table gives decode steps per second, ms per step, the slowdown against the unconstrained
batch, and the host time per step spent filling the rows' token bitmasks (xgrammar) and applying them to the logits
(on the logits' device), measured in a second pass so the timers' GPU synchronisation stays out of steps/s. The
schema's compile time (cold, on the worker thread) is printed above the table.

CPU: the bundled SmolLM2-135M-Instruct (fp32). GPU: the same model, or `--llama3-8b` for random bf16 weights of
Llama-3-8B's shapes with the bundled tokenizer's vocabulary (a grammar needs a real tokenizer; `--tokenizer DIR`
takes any Hugging Face tokenizer directory instead of the bundled one).

    .venv/bin/python benchmarks/structured_output.py [--rows 8] [--steps 32]
    python benchmarks/structured_output.py --llama3-8b --rows 64 --steps 64          # GPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_e2e import LLAMA3_8B  # noqa: E402

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org)$"},
    "role": {"enum": ["admin", "editor", "viewer"]}, "active": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4}},
    "required": ["name", "age", "email", "role", "active", "tags"]}  # fmt: skip
SCHEMA = {"type": "array", "minItems": 500, "items": PERSON}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class Timer:
    """Wraps a function and adds up the seconds spent in it. device=True: the device's time too (synchronised
    before, so queued work is not counted, and after); the mask fill is host work and overlaps the device."""

    def __init__(self, owner, name: str, device: bool) -> None:
        self.owner, self.name, self.seconds = owner, name, 0.0
        self.sync = device and torch.cuda.is_available()
        self.inner = getattr(owner, name)
        setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - start

    def restore(self) -> None:
        setattr(self.owner, self.name, self.inner)


def run(llm, rows: int, constrained: int, args) -> dict:
    from kvrun import SamplingParams
    from kvrun.engine.sampling_params import StructuredOutputParams
    from kvrun.runtime import sampler

    engine = llm.engine
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "List the people of our team as JSON."}], tokenize=False, add_generation_prompt=True
    )
    spec = StructuredOutputParams(json=SCHEMA)
    total = args.warmup + 2 * args.steps + 4
    requests = [
        engine.add_request(prompt, SamplingParams(max_tokens=total, temperature=0.8, seed=row, ignore_eos=True,
                                                  structured_output=spec if row < constrained else None))
        for row in range(rows)
    ]  # fmt: skip
    while min(len(request.output_token_ids) for request in requests) < args.warmup:
        engine.step()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    fill = Timer(engine.grammars(), "bitmask", device=False)
    apply = Timer(sampler, "apply_token_bitmask", device=True)
    for _ in range(args.steps):  # a second pass for the breakdown: the timers' synchronisation stays out of steps/s
        engine.step()
    fill.restore()
    apply.restore()
    failed = [request.error for request in requests if request.error]
    for request in requests:
        engine.abort_request(request.request_id)
    assert not failed, failed
    return {"constrained": constrained, "rate": args.steps / elapsed, "step_ms": elapsed / args.steps * 1e3,
            "fill_ms": fill.seconds / args.steps * 1e3, "apply_ms": apply.seconds / args.steps * 1e3}  # fmt: skip


def model_options(args, directory: Path) -> dict:
    if not args.llama3_8b and args.tokenizer is None:
        return {}
    from kvrun.runtime.loader import resolve_model

    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else resolve_model(None)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, directory / name)
    if not args.llama3_8b:
        return {"tokenizer": str(tokenizer_dir)}
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    config = {**LLAMA3_8B, "vocab_size": -(-vocab // 64) * 64, "bos_token_id": 1, "eos_token_id": 2}
    (directory / "config.json").write_text(json.dumps(config))
    return {"model": str(directory), "load_format": "dummy", "dtype": "bfloat16"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8, help="requests decoding together")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed")
    parser.add_argument("--warmup", type=int, default=6, help="tokens every row has before the timing starts")
    parser.add_argument("--llama3-8b", action="store_true", help="random bf16 weights of Llama-3-8B's shapes (GPU)")
    parser.add_argument("--tokenizer", help="a Hugging Face tokenizer directory (default: the bundled model's)")
    args = parser.parse_args()

    from kvrun import LLM
    from kvrun.engine.sampling_params import StructuredOutputParams

    with tempfile.TemporaryDirectory() as directory:
        llm = LLM(**model_options(args, Path(directory)), max_loras=0, max_num_seqs=max(args.rows, 8))
        start = time.perf_counter()
        llm.engine.grammars().compile(StructuredOutputParams(json=SCHEMA))
        compile_ms = (time.perf_counter() - start) * 1e3
        run(llm, min(args.rows, 2), 1, argparse.Namespace(**{**vars(args), "steps": 2}))  # warm-up
        results = [run(llm, args.rows, constrained, args) for constrained in sorted({0, 1, args.rows})]

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    model = "Llama-3-8B shapes (random bf16)" if args.llama3_8b else "SmolLM2-135M-Instruct"
    vocab = llm.engine.model_config.vocab_size
    print(f"\n{args.rows} rows decoding, {model}, vocabulary {vocab}; {where}")
    print(f"schema compile (cold): {compile_ms:.1f} ms\n")
    print("| constrained rows | steps/s | ms/step | vs none | mask fill ms/step | mask apply ms/step |")
    print("|---|---|---|---|---|---|")
    base = results[0]["step_ms"]
    for row in results:
        print(f"| {row['constrained']} of {args.rows} | {row['rate']:.2f} | {row['step_ms']:.1f} | "
              f"{row['step_ms'] / base:.2f}x | {row['fill_ms']:.2f} | {row['apply_ms']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
