"""Host time of an engine core's step with many streams: text made in the core vs token ids only, one run.

A tiny random Llama (2 layers, hidden 64) with the bundled SmolLM2 tokenizer runs `--streams` greedy requests of
`--new-tokens` tokens each (EOS ignored) on CPU, stepping in a thread as the engine core does, and each step's
outputs become the message the core sends (`Outputs` of deltas, encoded). Per decode step the table gives the
whole step (the engine's step plus the message), the forward pass and sampler, and the rest: the core's host work
(scheduling, the rows' bookkeeping, text, the message). The last column is the server's side where it makes the
text: turning one step's deltas back into outputs, as kvrun.serving.process_client does.

Modes, alternated `--repeat` times (medians of the per-run medians):
- text in the core: `LLMEngine(detokenize=True)`, what the core did before the server made the text;
- token ids only: `LLMEngine(detokenize=False)`, the core of `kvrun serve`;
- token ids only, every request with a stop string: those are still detokenized in the core;
- token ids only, the server calling transformers' `decode`: the server's text as it was made before it called the
  Rust tokenizer's decode directly (the core as in the second mode).

    .venv/bin/python benchmarks/core_step_host.py [--streams 64] [--new-tokens 128] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

MODES = {
    "text in the core (before)": dict(detokenize=True, stop=()),
    "token ids only (kvrun serve)": dict(detokenize=False, stop=()),
    "token ids only, all with a stop string": dict(detokenize=False, stop=("never appears in random text",)),
    "token ids only, server calling transformers' decode": dict(detokenize=False, stop=(), wrapper=True),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tiny_model(directory: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvrun.runtime.loader import resolve_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a wide spread, so greedy choices wander over the vocabulary rather than repeat
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(resolve_model(None) / name, directory / name)
    return directory


class TransformersDecode:
    """Only the tokenizer's `decode`: not a transformers tokenizer, so the detokenizer calls it as it is."""

    def __init__(self, tokenizer) -> None:
        self.decode = tokenizer.decode


def run_mode(engine, args, detokenize: bool, stop: tuple[str, ...], wrapper: bool = False) -> dict[str, float]:
    """Median milliseconds per decode step of each part."""
    import kvrun.engine.engine as engine_module
    from kvrun import SamplingParams
    from kvrun.engine.core import EngineRequest
    from kvrun.engine.core_process import Outputs, delta_of, encode
    from kvrun.serving.process_client import _Stream

    engine.detokenize = detokenize
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True, stop=stop)
    prompts = [[100 + (7 * index + position) % 40000 for position in range(args.prompt)]
               for index in range(args.streams)]  # fmt: skip
    requests = [engine.add_request(prompt, params) for prompt in prompts]
    tokenizer = TransformersDecode(engine.tokenizer) if wrapper else engine.tokenizer
    streams = {request.request_id: _Stream(None, EngineRequest(request.request_id, request.prompt_token_ids, params),
                                           tokenizer) for request in requests}  # fmt: skip
    device_s = [0.0]
    execute, sample = engine.runner.execute, engine_module.sample

    def timed(function):
        def call(*a, **k):
            started = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                device_s[0] += time.perf_counter() - started

        return call

    engine.runner.execute, engine_module.sample = timed(execute), timed(sample)
    rows = []
    try:
        while engine.has_unfinished():
            device_s[0] = 0.0
            started = time.perf_counter()
            outputs = engine.step()
            message = Outputs([delta_of(output) for output in outputs])
            encode(message)
            whole = time.perf_counter() - started
            started = time.perf_counter()
            if not detokenize:
                for delta in message.deltas:
                    streams[delta.request_id].output(delta)
            server = time.perf_counter() - started
            if len(outputs) == args.streams and all(len(output.token_ids) > 1 for output in outputs):  # decode
                rows.append((whole, device_s[0], whole - device_s[0], server))
    finally:
        engine.runner.execute, engine_module.sample = execute, sample
        engine.detokenize = True
    columns = list(zip(*rows))
    names = ("step", "device", "host", "server")
    return {name: 1000 * statistics.median(values) for name, values in zip(names, columns)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per request")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from kvrun import LLM

    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp) / "tiny")
        blocks = args.streams * ((args.prompt + args.new_tokens) // 16 + 2)
        engine = LLM(str(model), max_loras=0, device="cpu", num_blocks=blocks, max_num_seqs=args.streams).engine
        results: dict[str, list[dict]] = {mode: [] for mode in MODES}

        def measure() -> None:  # in a thread, as the core steps (see kvrun.engine.core_process.run_core)
            run_mode(engine, args, **MODES["text in the core (before)"])  # warm-up
            for _ in range(args.repeat):
                for mode, settings in MODES.items():
                    results[mode].append(run_mode(engine, args, **settings))

        worker = threading.Thread(target=measure, name="engine-core")
        worker.start()
        worker.join()
    print(f"{args.streams} streams, {args.new_tokens} new tokens, median per decode step over {args.repeat} runs\n")
    print("| mode | step ms | forward + sample ms | core host ms | server: deltas → text ms |")
    print("|---|---|---|---|---|")
    for mode, runs in results.items():
        median = {name: statistics.median(run[name] for run in runs) for name in runs[0]}
        server = f"{median['server']:.2f}" if not MODES[mode]["detokenize"] else "— (text in the message)"
        print(f"| {mode} | {median['step']:.2f} | {median['device']:.2f} | {median['host']:.2f} | {server} |")


if __name__ == "__main__":
    main()
