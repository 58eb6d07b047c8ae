"""Continuous batching: each step is a prefill of newly admitted requests or one decode token for every runner.

Admission takes waiting requests in arrival order while KV blocks, batch limits and an adapter slot allow; a request
whose adapter finds every slot pinned is passed over (it waits) so base-model and other-adapter requests behind it
still run. When decode needs a block the pool lacks, the newest running request is preempted: its blocks and slot
pin are released and it goes back to the front of the queue, to be recomputed from its tokens later.
"""

from __future__ import annotations

from collections import deque

from kvrun.adapters.manager import LoRAManager
from kvrun.config import SchedulerConfig
from kvrun.engine.block_manager import BlockManager
from kvrun.engine.request import Request, RequestStatus
from kvrun.runtime.forward_batch import BASE_SLOT, ScheduledBatch, ScheduledRequest


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, adapters: LoRAManager | None) -> None:
        self.config = config
        self.blocks = blocks
        self.adapters = adapters
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        admitted = self._admit()
        if admitted:
            return self._batch(admitted, is_prefill=True)
        if not self.running:
            return None
        self._make_room_for_decode()
        return self._batch(self.running, is_prefill=False)

    def _admit(self) -> list[Request]:
        admitted: list[Request] = []
        num_tokens = 0
        for request in list(self.waiting):
            if len(self.running) + len(admitted) >= self.config.max_num_seqs:
                break
            count = request.num_tokens
            if admitted and num_tokens + count > self.config.max_num_batched_tokens:
                break
            if not self.blocks.can_grow(request.block_table, count):
                break  # memory is the queue's order: nobody behind may jump a request that waits for blocks
            if not self._pin_adapter(request):
                continue  # its adapter waits for a slot; others behind it may run
            self.blocks.grow(request.block_table, count)
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = 0
            admitted.append(request)
            num_tokens += count
        self.running.extend(admitted)
        return admitted

    def _make_room_for_decode(self) -> None:
        index = 0
        while index < len(self.running):
            request = self.running[index]
            if self.blocks.can_grow(request.block_table, request.num_tokens):
                self.blocks.grow(request.block_table, request.num_tokens)
                index += 1
                continue
            victim = self.running[-1]
            self.preempt(victim)
            if victim is request:
                break

    def preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
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

    def _batch(self, requests: list[Request], is_prefill: bool) -> ScheduledBatch:
        # Group rows by adapter slot so each adapter's rows form one contiguous LoRA segment.
        ordered = sorted(requests, key=lambda request: request.adapter_slot)
        scheduled = []
        for request in ordered:
            if is_prefill:
                token_ids, start = request.all_token_ids, 0
            else:
                token_ids, start = [request.all_token_ids[-1]], request.num_tokens - 1
            params = request.params
            scheduled.append(
                ScheduledRequest(
                    request_id=request.request_id,
                    token_ids=token_ids,
                    start_position=start,
                    block_table=request.block_table,
                    adapter_slot=request.adapter_slot,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    top_k=params.top_k,
                    generator=request.generator,
                    num_logprobs=params.logprobs,
                )
            )
        return ScheduledBatch(is_prefill=is_prefill, requests=scheduled)
