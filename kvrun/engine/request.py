"""A request's life in the engine, and what the engine reports back."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvrun.adapters.ref import AdapterRef
from kvrun.engine.detokenizer import IncrementalDetokenizer
from kvrun.engine.sampling_params import SamplingParams
from kvrun.runtime.forward_batch import BASE_SLOT
from kvrun.runtime.sampler import SamplingRow

if TYPE_CHECKING:  # imports xgrammar; engines load it on the first constrained request
    from kvrun.structured.compiler import RequestGrammar


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: AdapterRef | None
    detokenizer: IncrementalDetokenizer | None
    generator: torch.Generator | None
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V sit in the cache (or are written by the step being run)
    # With async scheduling: the row of the last step's sampled tokens that holds this request's next token, still on
    # its way to the host (the scheduler counts it; the runner reads it on the device); -1: none
    pending_row: int = -1
    num_offered_blocks: int = 0  # leading full blocks offered to (or taken from) the prefix cache
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the full blocks hashed so far
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache when it was first admitted
    adapter_slot: int = BASE_SLOT
    # first position the adapter applies to (AdapterRef.start_position: 0, or later for an activated LoRA)
    adapter_start: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    text: str = ""
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    queue_time: float | None = None  # seconds from arrival to its first scheduled step (later preemptions aside)
    num_preemptions: int = 0
    slot_waits: int = 0  # steps it was passed over because every adapter slot was pinned
    error: str | None = None  # why it ended, when finish_reason is "error"
    sampling: SamplingRow | None = None  # the sampler's view of this request, set by the engine (shares the lists)
    grammar: RequestGrammar | None = None  # structured output: where the request stands in its grammar

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """num_tokens and the token still on its way to the host, if any."""
        return self.num_tokens + (self.pending_row >= 0)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass(slots=True)
class RequestOutput:
    """A request's state after a step: everything so far, plus what this step added (for streaming)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None = None
    adapter: str | None = None
    logprobs: list[dict[int, float]] | None = None
    error: str | None = None  # why the request ended when finish_reason is "error"; it alone ends, never its batch
    queue_time: float | None = None  # seconds it waited before its first scheduled step (None: not yet scheduled)
