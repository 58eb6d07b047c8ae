"""The engine: requests, scheduling, paged KV bookkeeping.

The types at each boundary, in the order data flows:

    CompletionRequest / GenerateRequest   (msgspec, kvrun.serving — HTTP edge)
      → Request                           (kvrun.engine.request: prompt ids, SamplingParams, AdapterRef, state)
      → ScheduledBatch                    (kvrun.runtime.forward_batch: host lists — who runs this step, block
                                           tables, adapter slots; rows grouped by slot)
      → ForwardBatch                      (device tensors: input ids, positions, AttentionMetadata, LoRABatchInfo)
      → logits → launch_sample(logits, [SamplingRow]) → SampledBatch (kvrun.runtime.sampler, one row per request;
                                           its tokens on the device feed the next step under async scheduling)
      → SampledToken | SamplingFailure → RequestOutput (text so far + this step's delta, for streaming; a failed row
                                           ends with finish_reason "error" and RequestOutput.error, alone)

Memory owners: BlockManager (KV pages), LoRAManager's SlotPool (adapter slots) and HostCache (parsed adapters).
"""

from kvrun.engine.engine import LLMEngine
from kvrun.engine.request import RequestOutput
from kvrun.engine.sampling_params import SamplingParams

__all__ = ["LLMEngine", "RequestOutput", "SamplingParams"]
