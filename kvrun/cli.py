"""`kvrun generate` (one prompt, offline), `kvrun serve` (the HTTP server) and `kvrun model-manifest` (the LoRA
shape table a registry checks pushes against)."""

from __future__ import annotations

import argparse
import logging
import sys

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvrun", description="Serve one base model to many LoRA adapters.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands)
    _add_serve(commands)
    _add_manifest(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped
        return EXIT_OK
    except (ValueError, LookupError, OSError) as error:
        print(f"kvrun: error: {error}", file=sys.stderr)
        return EXIT_ERROR


def _add_generate(commands) -> None:
    parser = commands.add_parser("generate", help="generate text for one prompt")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--model", default=None, help="HF model directory or .gguf file (default: bundled SmolLM2)")
    parser.add_argument("--adapter", default=None, help="PEFT adapter directory to apply")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.set_defaults(run=_generate)


def _generate(args: argparse.Namespace) -> int:
    from kvrun import LLM, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )
    llm = LLM(args.model, max_loras=1 if args.adapter else 0)
    adapter = None
    if args.adapter:
        adapter = "adapter"
        llm.load_adapter(adapter, args.adapter)
    if args.chat:
        output = llm.chat([{"role": "user", "content": args.prompt}], params, adapters=adapter)[0]
    else:
        output = llm.generate(args.prompt, params, adapters=adapter)[0]
    print(output.text)
    return EXIT_OK


def _add_manifest(commands) -> None:
    parser = commands.add_parser(
        "model-manifest",
        help="print the LoRA-targetable modules and shapes of a model (JSON, for `kvrun-adapters base set`)",
    )
    parser.add_argument("model", nargs="?", default=None, help="HF model directory or .gguf file (default: bundled)")
    parser.set_defaults(run=_manifest)


def _manifest(args: argparse.Namespace) -> int:
    import json

    from kvrun.runtime.loader import BUNDLED_NAME, read_config, resolve_model
    from kvrun.runtime.models.manifest import manifest
    from kvrun.runtime.models.registry import read_model_config

    model_dir = resolve_model(args.model, needs_weights=False)
    print(json.dumps(manifest(read_model_config(read_config(model_dir), args.model or BUNDLED_NAME)), indent=2))
    return EXIT_OK


def _add_serve(commands) -> None:
    parser = commands.add_parser("serve", help="start the HTTP server")
    parser.set_defaults(run=_serve)
    try:
        from kvrun.serving.main import add_arguments
    except ImportError:
        return
    add_arguments(parser)


def _serve(args: argparse.Namespace) -> int:
    from kvrun.serving.main import serve

    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
