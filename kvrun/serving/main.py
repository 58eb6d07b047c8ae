"""`kvrun serve [MODEL]`: flags → ServerConfig → checks that need no model (address, model path, registry URL) →
the model loaded (timed) → uvicorn running the Litestar app.

Every failure to start is one line on stderr, `kvrun: error: ...`, and a documented exit status (EXIT_* below).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from kvrun.serving.config import ServerConfig

EXIT_OK = 0
EXIT_ERROR = 1  # could not start: the model, an adapter of --lora-modules, the registry (the message says which)
EXIT_USAGE = 2  # a bad command line (argparse's own status)
EXIT_ADDRESS_IN_USE = 3  # --host/--port cannot be bound
MIB = 1024 * 1024
HUB_ID_HINT = (
    "kvrun serves local HF model directories (config.json + *.safetensors) and .gguf files and downloads nothing; "
    "fetch it on a machine with internet (`huggingface-cli download {model} --local-dir DIR`), then run "
    "`kvrun serve DIR`"
)

logger = logging.getLogger("kvrun.serve")


class StartupError(Exception):
    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help already says what the default means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS, False) or not action.option_strings:
            return text
        return super()._get_help_string(action)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig()
    parser.formatter_class = _HelpFormatter
    add = parser.add_argument
    add("model_tag", nargs="?", default=None, metavar="MODEL",
        help="HF model directory or .gguf file (default: the bundled SmolLM2); same as --model")  # fmt: skip
    add("--model", default=None, help="HF model directory or .gguf file (default: the bundled SmolLM2)")
    add("--served-model-name", default=None,
        help="the base model's id in the APIs (default: MODEL as given; the bundled model's name without one)")
    add("--tokenizer", default=None, help="directory with tokenizer.json / tokenizer_config.json (default: MODEL's)")
    add("--chat-template", default=None,
        help="a Jinja chat template, as a file path or the template itself (default: the tokenizer's)")
    add("--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=PATH",
        help="PEFT adapter directories to load at start and keep loaded: name=path, or JSON "
             '\'{"name": "sql", "path": "/srv/sql"}\' (repeatable; default: none)')  # fmt: skip
    add("--registry", default=None,
        help="adapter registry URL: redis://host:6379/0 or file:///path (default: env KVRUN_REGISTRY, else the "
             "embedded ~/.kvrun/registry); 'none' serves only adapters loaded by path")  # fmt: skip
    add("--host", default=defaults.host,
        help="address to bind; the default 127.0.0.1 answers only this machine: use 0.0.0.0 in a container or to "
             f"serve a network (default: {defaults.host})")  # fmt: skip
    add("--port", type=int, default=defaults.port, help="port to listen on")
    add("--api-key", default=os.environ.get("KVRUN_API_KEY"), help="require `Authorization: Bearer KEY` "
        "(default: env KVRUN_API_KEY)")  # fmt: skip
    add("--admin-key", default=os.environ.get("KVRUN_ADMIN_KEY"),
        help="key for /v1/load_lora_adapter and /v1/unload_lora_adapter (default: env KVRUN_ADMIN_KEY)")
    add("--max-loras", type=int, default=defaults.max_loras,
        help="adapter slots in the model (default: chosen from GPU memory at start-up; 8 on CPU)")
    add("--max-lora-rank", type=int, default=defaults.max_lora_rank, help="adapters of a higher rank are refused")
    add("--max-cpu-loras", type=int, default=defaults.max_cpu_loras,
        help="parsed adapters kept in host memory (and adapter versions the engine keeps loaded)")
    add("--max-trainable-tokens", type=int, default=defaults.max_trainable_tokens,
        help="token rows an adapter's trainable tokens (trainable_token_indices) may replace; 0 refuses them")
    add("--max-full-module-slots", type=int, default=defaults.max_full_module_slots,
        help="adapters with their own copy of the token embedding / output layer (modules_to_save) resident at once; "
             "each slot holds a copy of both layers (default 0: such adapters are refused)")  # fmt: skip
    add("--max-num-seqs", type=int, default=defaults.max_num_seqs,
        help="requests in one batch (default: 256 on GPU, 64 on CPU)")
    add("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens,
        help="tokens in one step: running decodes first, then prompt chunks (default: 512 on GPU, 256 on CPU)")
    add("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=defaults.enable_chunked_prefill,
        help="split long prompts over steps shared with running decodes")
    add("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=defaults.enable_prefix_caching,
        help="reuse the KV cache of a prompt prefix already computed with the same adapter")
    add("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    add("--max-queue", type=int, default=defaults.max_queue,
        help="requests that may wait beyond the running batch before the server answers 503/429")
    add("--queue-timeout", type=float, default=defaults.queue_timeout_s,
        help="seconds a request may wait to be scheduled (e.g. for an adapter slot) before 503; never counts its work")
    add("--block-size", type=int, default=defaults.block_size, help="tokens per KV block")
    add("--num-blocks", type=int, default=None,
        help="KV blocks (default: from --kv-cache-mib when given, else the GPU memory plan; 512 MiB worth on CPU)")
    add("--kv-cache-mib", type=int, default=None,
        help="KV cache size (default: what --gpu-memory-utilization leaves on GPU; 512 MiB on CPU)")
    add("--gpu-memory-utilization", type=float, default=defaults.gpu_memory_utilization,
        help="share of the GPU's memory to plan for: weights, activations, adapter slots, then the KV cache")
    add("--dtype", default=defaults.dtype, choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on CUDA, float32 on CPU")
    add("--device", default=defaults.device, help="auto: cuda when available, else cpu")
    add("--load-format", default=defaults.load_format, choices=["auto", "dummy"],
        help="dummy: random weights of the model config's shapes (benchmarks)")
    add("--no-cuda-graphs", action="store_true", help="run every step eagerly on CUDA")
    add("--cuda-graph-max-tokens", type=int, default=defaults.cuda_graph_max_tokens,
        help="steps with prompt tokens of up to this many tokens run as CUDA graphs captured in pieces between the "
             "attention calls (0: eagerly); decode steps are captured whole")
    add("--tensor-parallel-size", "-tp", type=int, default=defaults.tensor_parallel_size,
        help="split the model over this many GPUs (cuda:0 .. N-1), one process each; adapters are split with it")
    add("--async-scheduling", action=argparse.BooleanOptionalAction, default=defaults.async_scheduling,
        help="launch each step on the GPU before the previous step's tokens reach the host, so the host's work overlaps "
             "the GPU's (default: on for one GPU, off on CPU and under tensor parallelism, where it may be turned on)")
    add("--trust-request-chat-template", action="store_true",
        help="run a chat template a request sends in chat_template_kwargs (code the server runs: off by default)")
    add("--engine-process", action=argparse.BooleanOptionalAction, default=defaults.engine_process,
        help="step the engine in its own process, so HTTP work (tokenizing, streaming) never stalls a step")
    add("--cors-origin", action="append", default=[], help="allow browser calls from this origin (repeatable)")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add("--log-interval", type=float, default=defaults.log_interval_s,
        help="seconds between status lines (tok/s, running/waiting, KV usage, adapters); 0 = none")


def parse_lora_modules(values: list[str]) -> tuple[tuple[str, str], ...]:
    """vLLM's --lora-modules forms: `name=path` or a JSON object with `name` and `path`."""
    modules = []
    for value in values:
        if value.lstrip().startswith("{"):
            try:
                spec = json.loads(value)
                name, path = spec["name"], spec["path"]
            except (ValueError, KeyError, TypeError):
                raise StartupError(f"--lora-modules {value!r}: expected JSON with \"name\" and \"path\"",
                                   EXIT_USAGE) from None  # fmt: skip
        else:
            name, separator, path = value.partition("=")
            if not separator or not name or not path:
                raise StartupError(f"--lora-modules {value!r}: expected name=path", EXIT_USAGE)
        modules.append((str(name), str(path)))
    return tuple(modules)


def _chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{" not in value:  # neither a file nor a template: most likely a mistyped path
        raise StartupError(f"--chat-template {value!r}: no such file (and not a Jinja template)", EXIT_USAGE)
    return value


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    if args.model_tag and args.model and args.model_tag != args.model:
        raise StartupError(f"two models given: {args.model_tag!r} and --model {args.model!r}", EXIT_USAGE)
    model = args.model_tag or args.model
    no_registry = (args.registry or "").lower() == "none"
    try:
        return ServerConfig(
            model=model,
            registry=None if no_registry else args.registry,
            use_registry=not no_registry,
            host=args.host,
            port=args.port,
            served_model_name=args.served_model_name or model,
            tokenizer=args.tokenizer,
            chat_template=_chat_template(args.chat_template),
            lora_modules=parse_lora_modules(args.lora_modules),
            api_key=args.api_key or None,
            admin_key=args.admin_key or None,
            max_loras=args.max_loras,
            max_lora_rank=args.max_lora_rank,
            max_cpu_loras=max(args.max_cpu_loras, args.max_loras or 0),
            max_trainable_tokens=args.max_trainable_tokens,
            max_full_module_slots=args.max_full_module_slots,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
            max_queue=args.max_queue,
            queue_timeout_s=args.queue_timeout,
            block_size=args.block_size,
            num_blocks=args.num_blocks,
            kv_cache_memory_bytes=None if args.kv_cache_mib is None else args.kv_cache_mib * MIB,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enable_prefix_caching=args.enable_prefix_caching,
            enable_chunked_prefill=args.enable_chunked_prefill,
            dtype=args.dtype,
            device=args.device,
            load_format=args.load_format,
            cuda_graphs=not args.no_cuda_graphs,
            cuda_graph_max_tokens=args.cuda_graph_max_tokens,
            tensor_parallel_size=args.tensor_parallel_size,
            async_scheduling=args.async_scheduling,
            cors_origins=tuple(args.cors_origin),
            log_interval_s=args.log_interval,
            engine_process=args.engine_process,
            trust_request_chat_template=args.trust_request_chat_template,
        )
    except ValueError as error:
        raise StartupError(str(error), EXIT_USAGE) from None


def check_model(model: str | None) -> None:
    """Before anything loads: a model that is not there, with a hint when it looks like a Hub id."""
    if model is None:
        return
    path = Path(model).expanduser()
    if path.exists():
        return
    parts = model.split("/")
    if len(parts) == 2 and all(parts) and not model.startswith((".", "~")):
        raise StartupError(f"model {model!r} is not a local directory or .gguf file. " + HUB_ID_HINT.format(model=model))
    raise StartupError(f"model {model!r} not found (give an HF model directory or a .gguf file)")


def check_address(host: str, port: int) -> None:
    """Bind and release the address now, so a taken port is reported before the model spends time loading."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise StartupError(f"--host {host!r}: {error.strerror}", EXIT_ADDRESS_IN_USE) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as error:
            raise StartupError(f"cannot listen on {host}:{port}: {error.strerror} (is another server running? "
                               "choose another --port)", EXIT_ADDRESS_IN_USE) from None  # fmt: skip


def banner(config: ServerConfig, model_name: str, registry: str | None) -> str:
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    url = f"http://{host}:{config.port}"
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "Write one sentence about the sea."}], '
            '"max_tokens": 48}') % model_name  # fmt: skip
    auth = ' -H "Authorization: Bearer $KVRUN_API_KEY"' if config.api_key else ""
    return (
        f"kvrun is serving {model_name} at {url}  (registry: {registry or 'none'}; API docs: {url}/docs)\n"
        f"try:\n  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}\n"
        f"  (an adapter: set \"model\" to a registry ref such as team/name:prod — push one with `kvrun-adapters push`)"
    )


class _StartupFailure(logging.Filter):
    """Keeps uvicorn from printing the traceback of a start-up failure kvrun reports in one line itself."""

    def __init__(self) -> None:
        super().__init__()
        self.error: StartupError | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        return self.error is None


def _stop_when_a_worker_dies(engine, server, failure: _StartupFailure) -> None:
    """A tensor-parallel worker that dies leaves the engine unable to step: stop serving and exit with its story,
    so a supervisor restarts the server rather than a replica answering 503 forever."""
    workers = engine.runner.workers
    if workers is None:
        return

    def died() -> None:
        failure.error = StartupError(f"stopped serving: {workers.failure}")
        server.should_exit = True

    workers.on_death.append(died)


def serve(args: argparse.Namespace) -> int:
    try:
        return _serve(args)
    except StartupError as error:
        print(f"kvrun: error: {error}", file=sys.stderr)
        return error.status


def _serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    level = getattr(logging, args.log_level.upper())
    logging.getLogger().setLevel(level)
    logging.getLogger("kvrun").setLevel(level)
    check_model(config.model)
    check_address(config.host, config.port)

    import uvicorn
    from adapters_registry import redact_url

    from kvrun.serving.app import create_app, load_model

    started = time.perf_counter()
    try:
        loaded = load_model(config)
    except (ValueError, LookupError, OSError) as error:
        raise StartupError(f"cannot load model {config.model or '(bundled)'}: {error}") from None
    logger.info("loaded %s in %.1f s", loaded.info.model_name, time.perf_counter() - started)
    failure = _StartupFailure()

    def on_ready(serving) -> None:
        # The banner is for the person who ran the command: stdout, once, when requests can be served.
        print(banner(config, serving.model_name, redact_url(serving.store.url) if serving.store else None), flush=True)

    def on_failure(error: Exception) -> None:
        failure.error = StartupError(str(error))

    app = create_app(config, on_ready=on_ready, loaded=loaded, on_failure=on_failure)
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addFilter(failure)
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.host, port=config.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    )
    if loaded.engine is not None:  # an engine core process reports a dead worker as a failed step (503)
        _stop_when_a_worker_dies(loaded.engine, server, failure)
    try:
        server.run()
    except SystemExit:  # uvicorn exits this way when the lifespan fails; kvrun reports that in one line
        if failure.error is None:
            raise
    finally:
        uvicorn_log.removeFilter(failure)
    if failure.error is not None:
        raise failure.error
    return EXIT_OK if server.started else EXIT_ERROR
