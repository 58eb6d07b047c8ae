"""Continuous batching with chunked prefill: each step spends one token budget, running decodes first.

A step runs at most max_num_batched_tokens tokens. Running requests that decode take one token each first, so a long
prompt never stalls the streams already producing; running requests part-way through their prompt take the next
chunk of what is left; then waiting requests are admitted in arrival order with their first chunk while the budget,
max_num_seqs, KV blocks and an adapter slot allow. A row whose chunk reaches the end of its tokens samples the next
token; a chunk that stops short only fills the KV cache (the runner computes no logits for it). With chunked prefill
off, a prompt runs whole: it joins a step only when the budget left holds it, except the step's first prompt, which
may run over.

Admission keeps the queue's order for memory: a request that waits for KV blocks holds back everyone behind it. A
request whose adapter finds every slot pinned is passed over (it waits), so base-model and other-adapter requests
behind it still run; once it has waited SLOT_PATIENCE_STEPS steps, only base-model requests behind it are admitted
until it has a slot, so the slots' running requests drain and a steady stream for resident adapters cannot keep
every slot pinned for ever. When a running request needs a block the pool lacks, the newest running request not yet placed
in this step is preempted (the asking one itself when no newer one is left): its blocks and slot pin are released and
it goes back to the front of the queue, to be recomputed from its tokens later. A step that preempted admits nobody.

With prefix caching (see block_manager), an admitted request first takes the cached blocks of its longest cached
prefix under its adapter and computes only the rest; the last token always runs, since its logits give the next
token. Blocks are offered to the cache as soon as a placed row will fill them, so a request admitted later in the
same step already shares them (every layer writes the step's K/V before any row attends). If the step fails, the
blocks it offered are forgotten.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvrun.adapters.manager import AdapterLoadError, LoRAManager
from kvrun.config import SchedulerConfig
from kvrun.engine.block_manager import BlockManager, block_key, root_key
from kvrun.engine.request import Request, RequestStatus
from kvrun.runtime.forward_batch import BASE_SLOT, ScheduledBatch, ScheduledRequest

# Steps a request waiting for an adapter slot lets adapter requests behind it be admitted before it (they may pin
# the slots it waits for); then they wait for it.
SLOT_PATIENCE_STEPS = 16


@dataclass(slots=True)
class _Step:
    """The step being built: its rows in the order they were placed and the token budget left."""

    budget: int
    rows: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens it runs this step)
    placed: set[str] = field(default_factory=set)  # request ids of rows
    has_prompt: bool = False
    preempted: bool = False

    def add(self, request: Request, num_tokens: int) -> None:
        self.rows.append((request, num_tokens))
        self.placed.add(request.request_id)
        self.budget = max(0, self.budget - num_tokens)
        self.has_prompt = self.has_prompt or num_tokens > 1


@dataclass(slots=True)
class SchedulerStats:
    """Counters since start-up, for metrics (vLLM's prefix_cache_queries / prefix_cache_hits are in tokens)."""

    prefix_cache_queries: int = 0  # tokens of admitted requests, looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens whose K/V came from the cache
    computed_prompt_tokens: int = 0  # prompt tokens run through the model (the cache's misses, and recomputation)
    num_preemptions: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, adapters: LoRAManager | None,
                 length_regime: Callable[[int], bytes] | None = None) -> None:  # fmt: skip
        """length_regime: for a model whose rotary embedding depends on the prompt's length (LongRoPE), what a prompt
        of that length's K/V depend on besides its tokens (CausalLM.length_regime); part of the prefix-cache keys."""
        self.config = config
        self.length_regime = length_regime
        self.blocks = blocks
        self.adapters = adapters
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = SchedulerStats()
        self._failed: list[tuple[Request, str]] = []  # requests that can never run (their adapter failed to load)
        self._cached_this_step: list[int] = []  # blocks this step offered to the prefix cache

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def compiling_grammars(self) -> list:
        """The grammars of requests that wait for theirs to compile (LLMEngine.step waits on them when nothing else
        can run)."""
        return [request.grammar for request in [*self.running, *self.waiting]
                if request.grammar is not None and not request.grammar.ready]  # fmt: skip

    def schedule(self) -> ScheduledBatch | None:
        """Choose this step's rows and advance each row's num_computed_tokens past the tokens it runs."""
        step = _Step(self.config.max_num_batched_tokens)
        self._cached_this_step = []
        self._schedule_running(step)
        if not step.preempted:
            self._admit(step)
        return self._batch(step) if step.rows else None

    def take_failed(self) -> list[tuple[Request, str]]:
        """Requests the last schedule() found can never run, with why; the engine ends each one alone."""
        failed, self._failed = self._failed, []
        return failed

    def abandon_step(self) -> None:
        """The last scheduled step failed: its K/V may be half written, so no later request may reuse them."""
        self.blocks.uncache(self._cached_this_step)
        self._cached_this_step = []

    def _schedule_running(self, step: _Step) -> None:
        # Decodes (one token left to run) before prompt chunks; each group keeps admission order (sorted is stable).
        for request in sorted(self.running, key=lambda row: row.num_scheduled_tokens - row.num_computed_tokens > 1):
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step to make room for an older row
            count = self._chunk(request, step)
            if count and self._reserve(request, count, step):
                self._place(step, request, count)

    def _admit(self, step: _Step) -> None:
        slot_starved = False  # a request ahead waited too long for an adapter slot: adapter requests wait behind it
        for request in list(self.waiting):
            if len(self.running) >= self.config.max_num_seqs or not step.budget:
                break
            if slot_starved and request.adapter is not None:
                continue
            self._take_cached_prefix(request)
            count = self._chunk(request, step)
            if not count and request.grammar is not None and not request.grammar.ready:
                self._drop_blocks(request)
                continue  # it waits for its grammar, not for memory: others behind it may run
            if not count or not self.blocks.can_grow(request.block_table, request.num_computed_tokens + count):
                self._drop_blocks(request)
                break  # memory is the queue's order: nobody behind may jump a request that waits for blocks
            try:
                pinned = self._pin_adapter(request)
            except AdapterLoadError as error:
                self._drop_blocks(request)
                self._failed.append((request, str(error)))
                continue  # it ends with this error (LLMEngine.step); the queue goes on
            if not pinned:
                self._drop_blocks(request)
                request.slot_waits += 1
                slot_starved = slot_starved or request.slot_waits > SLOT_PATIENCE_STEPS
                continue  # its adapter waits for a slot; others behind it may run (for a while)
            request.slot_waits = 0
            self.blocks.grow(request.block_table, request.num_computed_tokens + count)
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if request.queue_time is None:
                request.queue_time = time.monotonic() - request.arrival_time
            self.stats.prefix_cache_queries += request.num_tokens
            self.stats.prefix_cache_hits += request.num_computed_tokens
            if not request.num_preemptions:
                request.num_cached_tokens = request.num_computed_tokens
            self._place(step, request, count)

    def _place(self, step: _Step, request: Request, count: int) -> None:
        """Add a row to the step, and offer the blocks it fills to the prefix cache."""
        step.add(request, count)
        if not self.blocks.enable_caching:
            return
        # Only blocks whose tokens are all on the host can be keyed: one that ends in a token still on its way to the
        # host is offered with the request's next step.
        end = min(request.num_computed_tokens + count, request.num_tokens) // self.blocks.block_size
        keys = self._block_keys(request, end)
        for index in range(request.num_offered_blocks, end):
            block = request.block_table[index]
            if self.blocks.cache(block, keys[index]):
                self._cached_this_step.append(block)
        request.num_offered_blocks = max(request.num_offered_blocks, end)

    def _take_cached_prefix(self, request: Request) -> None:
        """Start a waiting request's block table with the cached blocks of its longest cached prefix."""
        if not self.blocks.enable_caching:
            return
        # The last token always runs: its logits give the next token.
        hits = self.blocks.match(self._block_keys(request, (request.num_tokens - 1) // self.blocks.block_size))
        self.blocks.share(request.block_table, hits)
        request.num_computed_tokens = len(hits) * self.blocks.block_size
        request.num_offered_blocks = len(hits)

    def _drop_blocks(self, request: Request) -> None:
        self.blocks.free(request.block_table)
        request.num_computed_tokens = request.num_offered_blocks = 0

    def _block_keys(self, request: Request, num_blocks: int) -> list[bytes]:
        """The prefix-cache keys of request's first num_blocks full blocks, hashed once per request.

        A block whose tokens all precede the request's adapter start (an activated LoRA before its invocation) holds
        base-model K/V, so it is keyed as a base request's block and shared with base requests. The block holding the
        adapter start chains from a root naming the adapter and the start position: the K/V after it depend on both,
        and the start depends on the whole prompt (the last invocation in it), not on the tokens hashed so far."""
        keys, size = request.block_keys, self.blocks.block_size
        adapter_block = request.adapter_start // size if request.adapter is not None else num_blocks
        regime = b"" if self.length_regime is None else self.length_regime(len(request.prompt_token_ids))
        for index in range(len(keys), num_blocks):
            if index < adapter_block:
                parent = keys[-1] if keys else root_key(regime)
            elif index > adapter_block:
                parent = keys[-1]
            else:
                parent = _adapter_root(request, keys[-1] if keys else b"", regime)
            keys.append(block_key(parent, _token_slice(request, index * size, (index + 1) * size)))
        return keys

    def _chunk(self, request: Request, step: _Step) -> int:
        """How many of request's uncomputed tokens run this step (0: none fit, or it waits for its grammar)."""
        remaining = request.num_scheduled_tokens - request.num_computed_tokens
        if request.grammar is not None and not request.grammar.ready:
            # Its sampling waits for the grammar to compile (a large one takes seconds): the prompt before the token
            # that samples may prefill meanwhile, but no step waits for the compile.
            remaining -= 1
            if remaining <= 0:
                return 0
        if remaining <= step.budget:
            return remaining
        if self.config.enable_chunked_prefill:
            return step.budget
        return 0 if step.has_prompt else remaining

    def _reserve(self, request: Request, count: int, step: _Step) -> bool:
        """Grow request's blocks to cover count more tokens, preempting newer unplaced requests while the pool lacks."""
        needed = request.num_computed_tokens + count
        while not self.blocks.can_grow(request.block_table, needed):
            victim = next(other for other in reversed(self.running) if other.request_id not in step.placed)
            self.preempt(victim)
            step.preempted = True
            if victim is request:
                return False
        self.blocks.grow(request.block_table, needed)
        return True

    def preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = request.num_offered_blocks = 0
        request.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request) -> None:
        """Drop a finished or aborted request from whichever queue holds it and free what it holds."""
        if request in self.running:
            self.running.remove(request)
            self._release(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED

    def _pin_adapter(self, request: Request) -> bool:
        if request.adapter is None:
            request.adapter_slot = BASE_SLOT
            return True
        slot = self.adapters.acquire(request.adapter)
        if slot is None:
            return False
        request.adapter_slot = slot
        return True

    def _release(self, request: Request) -> None:
        self.blocks.free(request.block_table)
        if request.adapter is not None and request.adapter_slot != BASE_SLOT:
            self.adapters.release(request.adapter)
        request.adapter_slot = BASE_SLOT

    def _batch(self, step: _Step) -> ScheduledBatch:
        # Group rows by adapter slot so each adapter's rows form one contiguous LoRA segment (the sort is stable).
        scheduled = []
        for request, count in sorted(step.rows, key=lambda row: row[0].adapter_slot):
            start = request.num_computed_tokens
            request.num_computed_tokens = start + count
            self.stats.computed_prompt_tokens += max(0, min(start + count, len(request.prompt_token_ids)) - start)
            params = request.params
            token_ids = _token_slice(request, start, start + count)
            pending = start + count > request.num_tokens  # the last token is still on its way to the host
            scheduled.append(
                ScheduledRequest(
                    request_id=request.request_id,
                    token_ids=token_ids + [0] if pending else token_ids,
                    start_position=start,
                    block_table=request.block_table,
                    adapter_slot=request.adapter_slot,
                    adapter_start=request.adapter_start,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    top_k=params.top_k,
                    generator=request.generator,
                    num_logprobs=params.logprobs,
                    samples=start + count == request.num_scheduled_tokens,
                    previous_row=request.pending_row if pending else -1,
                    rope_length=len(request.prompt_token_ids),
                )
            )
        is_prefill = any(len(row.token_ids) > 1 or not row.samples for row in scheduled)
        adapters = self.adapters
        full_copies = adapters is not None and any(adapters.has_full_copies(row.adapter_slot) for row in scheduled)
        return ScheduledBatch(is_prefill=is_prefill, requests=scheduled, full_copies=full_copies)


def _adapter_root(request: Request, base_prefix_key: bytes, regime: bytes = b"") -> bytes:
    """The parent key of a request's first block that its adapter applies to: what its K/V depend on besides the
    tokens — the adapter's weights (by content) and settings, the prompt's rotary regime (see length_regime), and,
    for an activated LoRA starting past position 0, that position and the base-model prefix before it
    (base_prefix_key, the key of the last block before, which holds the regime already)."""
    identity = request.adapter.identity.encode() + (b"\0" + regime if regime else b"")
    if request.adapter_start:
        identity += b"\0start=%d\0" % request.adapter_start + base_prefix_key
    return root_key(identity)


def _token_slice(request: Request, start: int, end: int) -> list[int]:
    """request.all_token_ids[start:end] without copying the whole sequence (a decode row needs one token)."""
    prompt, output = request.prompt_token_ids, request.output_token_ids
    head = prompt[start:end] if start < len(prompt) else []
    return head + output[max(0, start - len(prompt)) : max(0, end - len(prompt))]
