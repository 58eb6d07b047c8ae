"""`kvrun serve` leaves sizing to the engine: flags default to "chosen at start-up", and the app reports the values
the engine chose (on CPU: the fixed defaults of kvrun.runtime.memory_plan)."""

from __future__ import annotations

import argparse

from kvrun.engine.engine import LLMEngine
from kvrun.runtime import memory_plan
from kvrun.serving.config import ServerConfig
from kvrun.serving.main import add_arguments, config_from_args


def parse(*flags: str) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(["--registry", "none", *flags]))


def test_flags_leave_sizing_to_the_engine_unless_given():
    config = parse()
    assert (config.max_loras, config.max_num_seqs, config.max_num_batched_tokens) == (None, None, None)
    assert config.kv_cache_memory_bytes is None and config.gpu_memory_utilization == 0.9
    assert config.enable_prefix_caching and config.enable_chunked_prefill
    given = parse("--max-loras", "40", "--gpu-memory-utilization", "0.5", "--kv-cache-mib", "64",
                  "--no-enable-prefix-caching", "--no-enable-chunked-prefill")  # fmt: skip
    assert (given.max_loras, given.max_cpu_loras, given.gpu_memory_utilization) == (40, 40, 0.5)
    assert given.kv_cache_memory_bytes == 64 << 20
    engine_config = given.engine_config()
    assert not engine_config.cache.enable_prefix_caching and not engine_config.scheduler.enable_chunked_prefill
    assert engine_config.cache.gpu_memory_utilization == 0.5


def test_resolved_config_carries_what_the_engine_chose(tiny_gqa):
    config = ServerConfig(model=str(tiny_gqa[0]), use_registry=False)
    engine = LLMEngine(config.engine_config())
    resolved = config.resolved(engine.config)
    assert resolved.max_loras == memory_plan.UNPLANNED_MAX_LORAS
    assert resolved.max_num_seqs == memory_plan.CPU_MAX_NUM_SEQS
    assert resolved.max_num_batched_tokens == memory_plan.CPU_MAX_NUM_BATCHED_TOKENS
    assert resolved.num_blocks == engine.blocks.num_blocks
