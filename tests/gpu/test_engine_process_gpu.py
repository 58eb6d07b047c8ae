"""`kvrun serve` with the engine core in its own process on CUDA (FlashInfer, Triton LoRA, CUDA graphs in the core,
initialised fresh in a forkserver child): the same greedy tokens as the offline engine in this process, for the
base model and an adapter, one request at a time (same batch, same kernels), and no process left after a stop."""

from __future__ import annotations

import os
import time

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from tests.factories import MIXED_ADAPTERS, make_adapter  # noqa: E402
from tests.gpu.test_engine_gpu import llama_dir  # noqa: E402

SETTINGS = dict(dtype="bfloat16", max_loras=2, max_lora_rank=16, max_num_seqs=16, gpu_memory_utilization=0.1)


def test_core_process_on_cuda_matches_the_offline_engine(tmp_path):
    from kvrun import LLM, SamplingParams
    from kvrun.serving import ServerConfig
    from tests.serving.server import start_server

    base = llama_dir(tmp_path / "base", hidden=256, heads=4, kv_heads=2, layers=2, intermediate=512, vocab=512)
    spec = MIXED_ADAPTERS[0]
    adapter = make_adapter(base, spec, tmp_path / spec.name, seed=1)
    prompts = [[5, 17, 42, 99, 7, 300, 12], [8, 9, 10, 11]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    llm = LLM(str(base), **SETTINGS)  # several test processes share the card
    llm.load_adapter(spec.name, adapter)
    expected = {(index, name): llm.generate([prompt], params, adapters=[name])[0].token_ids
                for index, prompt in enumerate(prompts) for name in (None, spec.name)}  # fmt: skip
    del llm
    torch.cuda.empty_cache()

    config = ServerConfig(model=str(base), use_registry=False, lora_modules=((spec.name, str(adapter)),),
                          engine_process=True, max_cpu_loras=4, **SETTINGS)  # fmt: skip
    server = start_server(config, startup_timeout_s=600)
    pid = server.serving.client.pid
    try:
        with server.client() as http:
            assert http.get("/info").json()["model_device_type"] == "cuda"
            for (index, name), tokens in expected.items():
                body = {"model": name or server.serving.model_name, "prompt": prompts[index], "max_tokens": 12,
                        "temperature": 0, "ignore_eos": True, "return_token_ids": True}  # fmt: skip
                response = http.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                assert response.json()["choices"][0]["token_ids"] == tokens, (index, name)
    finally:
        server.stop()
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}"), "the engine core process outlived its server"
