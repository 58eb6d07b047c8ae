"""The periodic status line of `kvrun serve`: throughput, queue depth, KV usage and resident adapters, every few
seconds while there is work (quiet when idle)."""

from __future__ import annotations

import asyncio
import logging
import time

from kvrun.serving.state import Serving

logger = logging.getLogger("kvrun.serve")
NAMES_SHOWN = 6  # resident adapters named in the line; the rest are counted


async def status_lines(serving: Serving, interval_s: float) -> None:
    previous_tokens, previous_time = serving.metrics.tokens_streamed, time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        try:
            snapshot = await asyncio.wait_for(serving.client.snapshot(), interval_s)
        except Exception:  # noqa: BLE001 - a wedged or stopped engine is reported by /health and /ready
            continue
        now, tokens = time.monotonic(), serving.metrics.tokens_streamed
        if tokens == previous_tokens and not (snapshot.num_running or snapshot.num_waiting):
            continue
        rate = (tokens - previous_tokens) / max(now - previous_time, 1e-9)
        previous_tokens, previous_time = tokens, now
        resident = [adapter.name for adapter in snapshot.adapters]
        in_slots = sum(1 for adapter in snapshot.adapters if adapter.slot is not None)
        named = ", ".join(resident[:NAMES_SHOWN]) + (f", +{len(resident) - NAMES_SHOWN}" if len(resident) > NAMES_SHOWN
                                                     else "")  # fmt: skip
        logger.info("%.1f tok/s generated, %d running, %d waiting, KV cache %.1f%% used, %d adapters resident "
                    "(%d in GPU slots)%s", rate, snapshot.num_running, snapshot.num_waiting, 100 * snapshot.kv_usage,
                    len(resident), in_slots, f": {named}" if resident else "")  # fmt: skip
