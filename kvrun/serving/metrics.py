"""Prometheus text exposition (format 0.0.4) with no client library: counters and histograms updated on the event
loop, gauges computed at scrape time from an engine snapshot.

Besides `kvrun_*`, what dashboards and inference gateways read from vLLM is exported under vLLM's names and labels
(`model_name`): the request histograms (TTFT, inter-token latency, end-to-end latency), token and request counters,
queue and KV gauges, and `vllm:lora_requests_info`, whose adapter lists use the canonical `ns/name@version` the
engine runs (however a client spelled the ref), so a gateway can route by queue depth and adapter affinity without
knowing kvrun.
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict

from kvrun.serving.snapshot import EngineSnapshot

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{name}="{_escape(str(value))}"' for name, value in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) or abs(value) > 2**53 else str(int(value))


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help, labels
        self.values: dict[tuple[str, ...], float] = defaultdict(float)

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        self.values[labels] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(self.label_names, key)} {_number(v)}" for key, v in sorted(self.values.items())]
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.buckets, self.label_names = name, help, buckets, labels
        self.counts: dict[tuple[str, ...], list[int]] = {}
        self.sums: dict[tuple[str, ...], float] = defaultdict(float)

    def observe(self, value: float, *labels: str) -> None:
        counts = self.counts.setdefault(labels, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[labels] += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, counts in sorted(self.counts.items()):
            cumulative = 0
            for bound, count in zip((*self.buckets, float("inf")), counts):
                cumulative += count
                le = 'le="+Inf"' if bound == float("inf") else f'le="{bound!r}"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {cumulative}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(self.sums[key])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {cumulative}")
        return lines


def _gauge(name: str, help: str, samples: list[tuple[dict[str, str], float]]) -> list[str]:
    lines = [f"# HELP {name} {help}", f"# TYPE {name} gauge"]
    for labels, value in samples:
        lines.append(f"{name}{_labels(tuple(labels), tuple(labels.values()))} {_number(value)}")
    return lines


class ServingMetrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.tokens_streamed = 0  # every generated token as it reaches the HTTP side (the status line's tok/s)
        self.requests = Counter("kvrun_requests_total", "Requests finished, by endpoint and outcome.",
                                ("endpoint", "outcome"))  # fmt: skip
        self.rejected = Counter("kvrun_requests_rejected_total", "Requests refused before reaching the engine.",
                                ("endpoint", "status"))  # fmt: skip
        self.prompt_tokens = Counter("kvrun_prompt_tokens_total", "Prompt tokens of finished requests.")
        self.generation_tokens = Counter("kvrun_generation_tokens_total", "Tokens generated.")
        self.adapter_requests = Counter("kvrun_adapter_requests_total", "Finished requests per adapter.", ("adapter",))
        self.adapter_tokens = Counter("kvrun_adapter_generation_tokens_total", "Tokens generated per adapter.",
                                      ("adapter",))  # fmt: skip
        self.adapter_fetches = Counter("kvrun_adapter_fetches_total", "Adapter versions fetched from the registry.",
                                       ("outcome",))  # fmt: skip
        self.ttft = Histogram("kvrun_time_to_first_token_seconds", "Arrival to first token.", LATENCY_BUCKETS)
        self.itl = Histogram("kvrun_inter_token_latency_seconds", "Time between streamed tokens.", ITL_BUCKETS)
        self.latency = Histogram("kvrun_request_latency_seconds", "Arrival to last token.", LATENCY_BUCKETS)
        model = ("model_name",)
        self.vllm_ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token (vLLM name).",
                                   LATENCY_BUCKETS, model)  # fmt: skip
        self.vllm_itl = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency (vLLM name).", ITL_BUCKETS,
                                  model)  # fmt: skip
        self.vllm_tpot = Histogram("vllm:time_per_output_token_seconds", "Inter-token latency (older vLLM name).",
                                   ITL_BUCKETS, model)  # fmt: skip
        self.vllm_e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token (vLLM name).",
                                  LATENCY_BUCKETS, model)  # fmt: skip
        self.vllm_queue = Histogram("vllm:request_queue_time_seconds", "Time waiting before the first scheduled "
                                    "step (vLLM name).", LATENCY_BUCKETS, model)  # fmt: skip
        self.vllm_success = Counter("vllm:request_success_total", "Finished requests (vLLM name).",
                                    ("model_name", "finished_reason"))  # fmt: skip
        self.vllm_prompt_tokens = Counter("vllm:prompt_tokens_total", "Prompt tokens (vLLM name).", model)
        self.vllm_generation_tokens = Counter("vllm:generation_tokens_total", "Generated tokens (vLLM name).", model)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.vllm_ttft.observe(seconds, self.model_name)

    def queued(self, seconds: float) -> None:
        self.vllm_queue.observe(seconds, self.model_name)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.vllm_itl.observe(seconds, self.model_name)
        self.vllm_tpot.observe(seconds, self.model_name)

    def completed(self, seconds: float) -> None:
        self.latency.observe(seconds)
        self.vllm_e2e.observe(seconds, self.model_name)

    def finished(self, endpoint: str, adapter: str | None, outcome: str, prompt_tokens: int, tokens: int) -> None:
        self.requests.inc(1, endpoint, outcome)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(tokens)
        label = adapter or self.model_name
        self.adapter_requests.inc(1, label)
        self.adapter_tokens.inc(tokens, label)
        self.vllm_prompt_tokens.inc(prompt_tokens, self.model_name)
        self.vllm_generation_tokens.inc(tokens, self.model_name)
        if outcome in ("stop", "length", "abort", "error"):
            self.vllm_success.inc(1, self.model_name, outcome)

    def render(self, snapshot: EngineSnapshot, in_flight: int) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.rejected, self.prompt_tokens, self.generation_tokens, self.adapter_requests,
                       self.adapter_tokens, self.adapter_fetches, self.ttft, self.itl, self.latency, self.vllm_ttft,
                       self.vllm_itl, self.vllm_tpot, self.vllm_e2e, self.vllm_queue, self.vllm_success,
                       self.vllm_prompt_tokens, self.vllm_generation_tokens):  # fmt: skip
            lines += metric.render()
        model = {"model_name": self.model_name}
        lines += _gauge("kvrun_requests_running", "Requests in the running batch.", [({}, snapshot.num_running)])
        lines += _gauge("kvrun_requests_waiting", "Requests queued in the engine.", [({}, snapshot.num_waiting)])
        lines += _gauge("kvrun_requests_in_flight", "Requests admitted by the server and not yet done.",
                        [({}, in_flight)])  # fmt: skip
        lines += _gauge("kvrun_tensor_parallel_size", "Devices the model is split over; KV blocks and adapter slots "
                        "below span all of them.", [({}, snapshot.tensor_parallel_size)])  # fmt: skip
        lines += _gauge("kvrun_kv_blocks_total", "KV cache blocks.", [({}, snapshot.num_blocks)])
        lines += _gauge("kvrun_kv_blocks_free", "Free KV cache blocks.", [({}, snapshot.num_free_blocks)])
        lines += _gauge("kvrun_kv_cache_usage_ratio", "Fraction of KV blocks in use.", [({}, snapshot.kv_usage)])
        lines += _gauge("kvrun_adapter_resident", "Adapter versions known to the engine, by where their weights are.",
                        [({"adapter": a.name, "location": a.location}, 1) for a in snapshot.adapters])  # fmt: skip
        lines += _gauge("kvrun_adapter_slot_pins", "Running requests pinning each adapter's slot.",
                        [({"adapter": a.name}, a.pins) for a in snapshot.adapters])  # fmt: skip
        lines += _gauge("kvrun_adapter_in_flight", "Live requests (running or waiting) per adapter version.",
                        [({"adapter": a.name}, a.holds) for a in snapshot.adapters])  # fmt: skip
        lines += _gauge("vllm:num_requests_running", "Running requests (vLLM name).", [(model, snapshot.num_running)])
        lines += _gauge("vllm:num_requests_waiting", "Waiting requests (vLLM name).", [(model, snapshot.num_waiting)])
        lines += _gauge("vllm:kv_cache_usage_perc", "KV usage, 0-1 (vLLM name).", [(model, snapshot.kv_usage)])
        lines += _gauge("vllm:gpu_cache_usage_perc", "KV usage, 0-1 (older vLLM name).", [(model, snapshot.kv_usage)])
        lines += _gauge("vllm:lora_requests_info", "Adapters by canonical name: running, waiting, and resident in a "
                        "slot (value: scrape time).", [(lora_info(snapshot), time.time())])  # fmt: skip
        return "\n".join(lines) + "\n"


def lora_info(snapshot: EngineSnapshot) -> dict[str, str]:
    """vLLM's labels, naming each adapter version as the engine runs it (`ns/name@3`, or a path-loaded name), so
    `team/x`, `team/x:prod` and `team/x@1` are one adapter, as they are one slot. `running`: some running request
    uses it; `waiting`: only queued requests do; `resident_lora_adapters` (kvrun's) adds the idle ones that still
    hold a slot, which a router can send work to without a load."""
    running = [adapter.name for adapter in snapshot.adapters if adapter.pins]
    waiting = [adapter.name for adapter in snapshot.adapters if adapter.holds > adapter.pins]
    resident = [adapter.name for adapter in snapshot.adapters if adapter.slot is not None]
    return {
        "max_lora": str(snapshot.max_loras),
        "running_lora_adapters": ",".join(running),
        "waiting_lora_adapters": ",".join(waiting),
        "resident_lora_adapters": ",".join(resident),
    }
