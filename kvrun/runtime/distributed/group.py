"""The tensor-parallel group one rank computes in: its rank, the group's size, and the collectives it needs.

The process group is built directly from a TCPStore (not torch.distributed's default group), so an engine with
tensor parallelism never claims the process-wide default group: tests and tools may hold several engines at once.
gloo on CPU, NCCL on CUDA; both are torch.distributed's own backends.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kvrun.runtime.attention.base import alibi_slopes
from kvrun.runtime.layers.linear import Split, shard
from kvrun.runtime.models.spec import ModelConfig

# A collective that waits longer than this means a rank is gone (a step takes well under a second).
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=300)


@dataclass(eq=False)
class TensorParallel:
    rank: int
    size: int
    group: dist.ProcessGroup

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum tensor over the ranks, in place; returns it."""
        self.group.allreduce([tensor]).wait()
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor into tensor on every rank, in place; returns it. On CUDA the host does not wait."""
        self.group.broadcast(tensor, 0).wait()
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[rows, n] on every rank → [rows, size · n], rank 0's columns first."""
        tensor = tensor.contiguous()
        gathered = tensor.new_empty((self.size * tensor.shape[0], *tensor.shape[1:]))
        self.group._allgather_base(gathered, tensor).wait()
        return gathered.view(self.size, *tensor.shape).movedim(0, -2).reshape(*tensor.shape[:-1], -1)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def make_group(store: dist.Store, rank: int, size: int, device: torch.device) -> TensorParallel:
    """Join the group (blocks until every rank has joined: gloo connects its mesh here, NCCL at the first call)."""
    if backend_for(device) == "gloo":
        group = dist.ProcessGroupGloo(store, rank, size, COLLECTIVE_TIMEOUT)
    else:
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = COLLECTIVE_TIMEOUT
        group = dist.ProcessGroupNCCL(store, rank, size, options)
    return TensorParallel(rank, size, group)


def check_shardable(config: ModelConfig, size: int) -> None:
    """Refuse, with the reason, a model whose heads or MLP cannot be split over `size` ranks."""
    if size == 1:
        return
    problems = []
    if config.num_heads % size:
        problems.append(f"num_attention_heads {config.num_heads} is not divisible by it")
    if config.num_kv_heads % size and size % config.num_kv_heads:
        problems.append(
            f"num_key_value_heads {config.num_kv_heads} neither divides by it nor divides it (for replication)"
        )
    if config.decoder.mlp.intermediate_size % size:
        problems.append(f"intermediate_size {config.decoder.mlp.intermediate_size} is not divisible by it")
    if problems:
        raise ValueError(f"{config.name} cannot run with tensor_parallel_size={size}: " + "; ".join(problems))


def local_heads(config: ModelConfig, tp: TensorParallel | None) -> tuple[int, int]:
    """(query heads, K/V heads) one rank holds."""
    if tp is None or tp.size == 1:
        return config.num_heads, config.num_kv_heads
    return (
        Split(config.num_heads).local_width(tp.rank, tp.size),
        Split(config.num_kv_heads).local_width(tp.rank, tp.size),
    )


def local_alibi_slopes(config: ModelConfig, tp: TensorParallel | None) -> torch.Tensor | None:
    """[query heads of this rank] fp32: the whole model's ALiBi slopes of the heads this rank holds (rank r of N
    holds heads [r·h/N, (r+1)·h/N)); None for a model without ALiBi."""
    if not any(variant.alibi for variant in config.attention_variants):
        return None
    return shard(alibi_slopes(config.num_heads), (Split(config.num_heads),), tp)
