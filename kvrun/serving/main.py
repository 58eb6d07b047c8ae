"""`kvrun serve`: flags → ServerConfig → uvicorn running the Litestar app."""

from __future__ import annotations

import argparse
import logging
import os
import shlex

from kvrun.serving.config import ServerConfig

EXIT_OK, EXIT_ERROR = 0, 1
MIB = 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig()
    add = parser.add_argument
    add("--model", default=None, help="HF model directory or .gguf file (default: the bundled SmolLM2)")
    add("--served-model-name", default=None, help="the base model's id in the APIs (default: the model's name)")
    add("--registry", default=None,
        help="adapter registry URL: redis://host:6379/0 or file:///path (default: env KVRUN_REGISTRY, else the "
             "embedded ~/.kvrun/registry); 'none' serves only adapters loaded by path")  # fmt: skip
    add("--host", default=defaults.host)
    add("--port", type=int, default=defaults.port)
    add("--api-key", default=os.environ.get("KVRUN_API_KEY"), help="require `Authorization: Bearer KEY` "
        "(default: env KVRUN_API_KEY)")  # fmt: skip
    add("--admin-key", default=os.environ.get("KVRUN_ADMIN_KEY"),
        help="key for /v1/load_lora_adapter and /v1/unload_lora_adapter (default: env KVRUN_ADMIN_KEY)")
    add("--max-loras", type=int, default=defaults.max_loras, help="adapter slots in the model")
    add("--max-lora-rank", type=int, default=defaults.max_lora_rank)
    add("--max-cpu-loras", type=int, default=defaults.max_cpu_loras,
        help="parsed adapters kept in host memory (and adapter versions the engine keeps loaded)")
    add("--max-num-seqs", type=int, default=defaults.max_num_seqs, help="requests in one batch")
    add("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens)
    add("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    add("--max-queue", type=int, default=defaults.max_queue,
        help="requests that may wait beyond the running batch before the server answers 503/429")
    add("--queue-timeout", type=float, default=defaults.queue_timeout_s,
        help="seconds a request may wait for its first token (e.g. for an adapter slot) before 503")
    add("--block-size", type=int, default=defaults.block_size, help="tokens per KV block")
    add("--num-blocks", type=int, default=None, help="KV blocks (default: sized from --kv-cache-mib)")
    add("--kv-cache-mib", type=int, default=defaults.kv_cache_memory_bytes // MIB)
    add("--dtype", default=defaults.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    add("--device", default=defaults.device)
    add("--load-format", default=defaults.load_format, choices=["auto", "dummy"],
        help="dummy: random weights of the model config's shapes (benchmarks)")
    add("--no-cuda-graphs", action="store_true", help="run decode steps eagerly on CUDA")
    add("--cors-origin", action="append", default=[], help="allow browser calls from this origin (repeatable)")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    no_registry = (args.registry or "").lower() == "none"
    return ServerConfig(
        model=args.model,
        registry=None if no_registry else args.registry,
        use_registry=not no_registry,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        api_key=args.api_key or None,
        admin_key=args.admin_key or None,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_cpu_loras=max(args.max_cpu_loras, args.max_loras),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        max_queue=args.max_queue,
        queue_timeout_s=args.queue_timeout,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        kv_cache_memory_bytes=args.kv_cache_mib * MIB,
        dtype=args.dtype,
        device=args.device,
        load_format=args.load_format,
        cuda_graphs=not args.no_cuda_graphs,
        cors_origins=tuple(args.cors_origin),
    )


def banner(config: ServerConfig, model_name: str, registry: str | None) -> str:
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    url = f"http://{host}:{config.port}"
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "Write one sentence about the sea."}], '
            '"max_tokens": 48}') % model_name  # fmt: skip
    auth = ' -H "Authorization: Bearer $KVRUN_API_KEY"' if config.api_key else ""
    return (
        f"kvrun is serving {model_name} at {url}  (registry: {registry or 'none'}; API docs: {url}/schema)\n"
        f"try:\n  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}\n"
        f"  (an adapter: set \"model\" to a registry ref such as team/name:prod — push one with `kvrun-adapters push`)"
    )


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from kvrun.serving.app import create_app

    config = config_from_args(args)
    level = getattr(logging, args.log_level.upper())
    logging.getLogger().setLevel(level)
    logging.getLogger("kvrun").setLevel(level)

    def on_ready(serving) -> None:
        # The banner is for the person who ran the command: stdout, once, when requests can be served.
        print(banner(config, serving.model_name, serving.store.url if serving.store else None), flush=True)

    app = create_app(config, on_ready=on_ready)
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=config.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    )
    server.run()
    return EXIT_OK if server.started else EXIT_ERROR
