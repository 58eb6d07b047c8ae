"""Sampling on the GPU queues its work without waiting for the device: under async scheduling the host samples a
step while the device still runs it, so a host sync there (a blocking copy of a list to the device, a read of a
value) would hold the host until that step ends and the next step could not be prepared meanwhile.

torch.cuda.set_sync_debug_mode("error") turns any synchronizing call into an error."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from kvrun.engine.sampling_params import SamplingParams  # noqa: E402
from kvrun.runtime.sampler import SampledToken, SamplingRow, launch_sample  # noqa: E402

VOCAB = 1000


def test_drawn_penalised_biased_and_logprob_rows_sample_without_a_host_sync():
    generator = torch.Generator(device="cuda").manual_seed(3)
    history = list(range(10, 40))
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=0.7, top_k=20, min_p=0.05, logprobs=3),
        SamplingParams(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2),
        SamplingParams(temperature=0.9, logit_bias={5: 3.0, 6: -100.0}, max_tokens=64, min_tokens=40, seed=3),
        SamplingParams(temperature=0.0, logprobs=0),
    ]
    rows = [
        SamplingRow(option, generator if option.seed is not None else None, history, history[:5], (2,))
        for option in params
    ]
    logits = torch.randn(len(rows), VOCAB, device="cuda")
    torch.cuda._sleep(10**8)  # the device is still busy when sampling is queued behind this
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampled = launch_sample(logits, rows, None, overlap=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    results = sampled.results()
    assert all(isinstance(result, SampledToken) and 0 <= result.token_id < VOCAB for result in results), results
    assert results[4].token_id != 2  # min_tokens holds the row's held token back
