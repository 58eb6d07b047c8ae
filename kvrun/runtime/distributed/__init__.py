"""Tensor parallelism: one model split over N devices, each rank in its own process, driven by rank 0.

group.py     TensorParallel (rank, size, process group; all-reduce and all-gather), shardability check
executor.py  TensorParallelRunner: rank 0 in the engine's process, starting and driving the workers
worker.py    the worker process of ranks 1..N-1
The layers split themselves (kvrun.runtime.layers.linear Projection, layers.vocab); docs/tensor_parallel.md has
the design and the communication each layer adds.
"""

from __future__ import annotations

from pathlib import Path

from kvrun.config import EngineConfig
from kvrun.runtime.model_runner import ModelRunner


def create_runner(model_dir: Path, config: EngineConfig, model_name: str) -> ModelRunner:
    """The engine's runner: the model on one device, or rank 0 of `config.tensor_parallel_size` ranks."""
    if config.tensor_parallel_size == 1:
        return ModelRunner(model_dir, config, model_name)
    from kvrun.runtime.distributed.executor import TensorParallelRunner

    return TensorParallelRunner(model_dir, config, model_name)
