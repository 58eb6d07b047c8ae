"""Prometheus text exposition (format 0.0.4) with no client library: counters and histograms updated on the event
loop, gauges computed at scrape time from an engine snapshot.

Besides `kvrun_*`, the gauges inference gateways read from vLLM are exported under vLLM's names
(`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, `vllm:lora_requests_info`), so
a gateway can route by queue depth and adapter affinity without knowing kvrun.
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

    def finished(self, endpoint: str, adapter: str | None, outcome: str, prompt_tokens: int, tokens: int) -> None:
        self.requests.inc(1, endpoint, outcome)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(tokens)
        label = adapter or self.model_name
        self.adapter_requests.inc(1, label)
        self.adapter_tokens.inc(tokens, label)

    def render(self, snapshot: EngineSnapshot, in_flight: int) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.rejected, self.prompt_tokens, self.generation_tokens, self.adapter_requests,
                       self.adapter_tokens, self.adapter_fetches, self.ttft, self.itl, self.latency):  # fmt: skip
            lines += metric.render()
        model = {"model_name": self.model_name}
        lines += _gauge("kvrun_requests_running", "Requests in the running batch.", [({}, snapshot.num_running)])
        lines += _gauge("kvrun_requests_waiting", "Requests queued in the engine.", [({}, snapshot.num_waiting)])
        lines += _gauge("kvrun_requests_in_flight", "Requests admitted by the server and not yet done.",
                        [({}, in_flight)])  # fmt: skip
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
        info = {
            "max_lora": str(snapshot.max_loras),
            "running_lora_adapters": ",".join(snapshot.running_adapters),
            "waiting_lora_adapters": ",".join(snapshot.waiting_adapters),
        }
        lines += _gauge("vllm:lora_requests_info", "Running and waiting adapters (value: scrape time).",
                        [(info, time.time())])  # fmt: skip
        return "\n".join(lines) + "\n"
