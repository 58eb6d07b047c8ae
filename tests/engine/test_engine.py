"""Continuous batching, KV-pool pressure, aborts and request validation on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from kvrun import LLM, SamplingParams
from kvrun.adapters.manager import UnknownAdapterError

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def make_llm(tiny_gqa, **kwargs) -> LLM:
    base, adapters = tiny_gqa
    llm = LLM(str(base), max_lora_rank=16, block_size=4, **{"max_loras": 4, "num_blocks": 128, **kwargs})
    for name, directory in adapters.items():
        llm.load_adapter(name, directory)
    return llm


def prompts(count: int, seed: int = 3) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (4 + 3 * i,), generator=generator).tolist() for i in range(count)]


def alone(llm: LLM, prompt: list[int], adapter: str | None, params: SamplingParams = GREEDY) -> list[int]:
    return llm.generate([prompt], params, adapters=[adapter])[0].token_ids


def run_to_completion(engine, requests) -> dict[str, list[int]]:
    done = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output.token_ids
    return {request.request_id: done[request.request_id] for request in requests}


def test_request_joining_mid_run_matches_running_alone(tiny_gqa):
    llm = make_llm(tiny_gqa)
    adapters = [*tiny_gqa[1], None]
    rows = list(zip(prompts(5), adapters))
    expected = [alone(llm, prompt, adapter) for prompt, adapter in rows]
    engine = llm.engine
    first = engine.add_request(rows[0][0], GREEDY, rows[0][1])
    for _ in range(3):
        engine.step()
    later = [engine.add_request(prompt, GREEDY, adapter) for prompt, adapter in rows[1:]]
    results = run_to_completion(engine, [first, *later])
    assert list(results.values()) == expected


def test_full_kv_pool_makes_requests_wait_and_still_finish_correctly(tiny_gqa):
    # 12 blocks of 4 tokens: each request needs up to 4 blocks, six of them need 24.
    llm = make_llm(tiny_gqa, num_blocks=12)
    adapters = [*tiny_gqa[1], None, None]
    rows = [(prompt[:6], adapter) for prompt, adapter in zip(prompts(6, seed=9), adapters)]
    expected = [alone(llm, prompt, adapter) for prompt, adapter in rows]
    engine = llm.engine
    requests = [engine.add_request(prompt, GREEDY, adapter) for prompt, adapter in rows]
    most_waiting = 0
    done = {}
    while engine.has_unfinished():
        most_waiting = max(most_waiting, engine.num_waiting)
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output.token_ids
    assert most_waiting > 0
    assert any(request.num_preemptions > 0 for request in requests)
    assert [done[request.request_id] for request in requests] == expected
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_abort_frees_blocks_and_adapter_pins(tiny_gqa):
    llm = make_llm(tiny_gqa)
    engine = llm.engine
    name = next(iter(tiny_gqa[1]))
    request = engine.add_request(prompts(1)[0], GREEDY, name)
    engine.step()
    assert engine.blocks.num_free < engine.blocks.num_blocks
    assert engine.adapters.slots.pins(request.adapter) == 1
    output = engine.abort_request(request.request_id)
    assert output.finished and output.finish_reason == "abort"
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.adapters.slots.pins(request.adapter) == 0
    assert not engine.has_unfinished()


def test_a_steady_stream_for_a_resident_adapter_cannot_starve_one_waiting_for_a_slot(tiny_gqa):
    """One slot, held by adapter `held`: requests for it keep arriving (every other step), each extending its pin.
    The request for `other` is passed over for a while, then adapter requests behind it wait until it has the slot;
    base-model requests still run beside it. Its tokens equal its solo run's."""
    from kvrun.engine.scheduler import SLOT_PATIENCE_STEPS

    llm = make_llm(tiny_gqa, max_loras=1, max_num_seqs=4)
    held, other = list(tiny_gqa[1])[:2]
    engine, prompt = llm.engine, prompts(1)[0]
    engine.add_request(prompt, GREEDY, held)
    engine.step()
    waiting = engine.add_request(prompt, GREEDY, other)
    base = engine.add_request(prompt, GREEDY, None)
    steps = 0
    while not waiting.is_finished:
        assert steps < 10 * SLOT_PATIENCE_STEPS, f"the request for {other} got no slot in {steps} steps"
        if steps % 2 == 0:
            engine.add_request(prompt, GREEDY, held)
        engine.step()
        steps += 1
    while engine.has_unfinished():
        engine.step()
    assert base.output_token_ids == alone(llm, prompt, None)
    assert waiting.output_token_ids == alone(llm, prompt, other)


def test_seeded_sampling_is_reproducible_and_independent_of_batch(tiny_gqa):
    llm = make_llm(tiny_gqa)
    prompt = prompts(1)[0]
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    solo = llm.generate([prompt], params)[0].token_ids
    crowd = llm.generate([prompt, *prompts(3, seed=4)], [params] + [SamplingParams(max_tokens=5, temperature=1.0)] * 3)
    assert crowd[0].token_ids == solo
    other = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True))[0]
    assert other.token_ids != solo


def test_stop_token_ids_and_length(tiny_gqa):
    llm = make_llm(tiny_gqa)
    prompt = prompts(1)[0]
    tokens = alone(llm, prompt, None)
    stop_at = tokens[4]
    output = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[stop_at]))[0]
    assert output.token_ids == tokens[: tokens.index(stop_at) + 1]
    assert output.finish_reason == "stop" and output.stop_reason == stop_at
    short = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))[0]
    assert short.token_ids == tokens[:3] and short.finish_reason == "length"


def test_request_validation(tiny_gqa):
    llm = make_llm(tiny_gqa)
    with pytest.raises(UnknownAdapterError):
        llm.generate([[5, 6]], GREEDY, adapters=["nope"])
    with pytest.raises(ValueError, match="context length"):
        llm.generate([[5] * 250], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[5, 100000]], GREEDY)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("text needs a tokenizer", GREEDY)
    for bad in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"logprobs": 50}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert not llm.engine.has_unfinished()
    assert llm.generate([[5, 6]], GREEDY)[0].finish_reason == "length"  # still serving


def test_unloaded_adapter_is_refused_but_others_keep_serving(tiny_gqa):
    llm = make_llm(tiny_gqa)
    first, second = list(tiny_gqa[1])[:2]
    prompt = prompts(1)[0]
    expected = alone(llm, prompt, second)
    llm.unload_adapter(first)
    with pytest.raises(UnknownAdapterError):
        llm.generate([prompt], GREEDY, adapters=[first])
    assert alone(llm, prompt, second) == expected


def test_a_failed_generate_leaves_nothing_queued(tiny_gqa):
    llm = make_llm(tiny_gqa)
    engine = llm.engine
    execute = engine.runner.execute
    calls = []

    def fails_on_the_third_step(batch, previous=None):
        calls.append(batch)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return execute(batch, previous)

    engine.runner.execute = fails_on_the_third_step
    with pytest.raises(RuntimeError, match="device lost"):
        llm.generate(prompts(3), GREEDY, adapters=[next(iter(tiny_gqa[1])), None, None])
    engine.runner.execute = execute
    assert not engine.has_unfinished()
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert all(engine.adapters.slots.pins(ref) == 0 for ref in engine.adapters.slots.resident())
    assert llm.generate([[5, 6]], GREEDY)[0].finish_reason == "length"  # still serving


def test_an_adapter_whose_weights_cannot_be_reloaded_fails_its_requests_alone(tiny_gqa, tmp_path):
    """A path-loaded adapter evicted from host memory and slot, whose directory is then gone: its requests end with
    finish_reason "error"; base rows and other adapters in the same steps go on, and the engine keeps serving."""
    import shutil

    base, adapters = tiny_gqa
    moved = tmp_path / "attn-r4"
    shutil.copytree(adapters["attn-r4"], moved)
    llm = LLM(str(base), max_loras=2, max_lora_rank=16, num_blocks=64, block_size=4)
    llm.load_adapter("doomed", moved)
    llm.load_adapter("fine", adapters["all-r8"])
    manager = llm.engine.adapters
    ref = manager.resolve("doomed")
    manager.host.drop(ref)
    shutil.rmtree(moved)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    outputs = llm.generate(prompts, params, adapters=["doomed", None, "fine"])
    assert outputs[0].finish_reason == "error" and "could not be loaded" in outputs[0].error
    assert [o.finish_reason for o in outputs[1:]] == ["length", "length"]
    alone = llm.generate(prompts[1:], params, adapters=[None, "fine"])
    assert [o.token_ids for o in outputs[1:]] == [o.token_ids for o in alone]
    assert not llm.engine.has_unfinished() and manager.slots.pins(ref) == 0


def test_a_path_adapter_whose_files_changed_since_loading_says_so(tiny_gqa, tmp_path):
    """Evicted from host memory and slot, then its directory holds other weights: requests for it end with an error
    that says the files changed and to load it again (never the new weights under the old identity); loading it
    again serves the new weights."""
    import shutil

    base, adapters = tiny_gqa
    directory = tmp_path / "changing"
    shutil.copytree(adapters["attn-r4"], directory)
    llm = LLM(str(base), max_loras=1, max_lora_rank=16, num_blocks=64, block_size=4)
    llm.load_adapter("changing", directory)
    manager = llm.engine.adapters
    manager.host.drop(manager.resolve("changing"))
    shutil.rmtree(directory)
    shutil.copytree(adapters["all-r8"], directory)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    (output,) = llm.generate([[5, 6, 7, 8]], params, adapters=["changing"])
    assert output.finish_reason == "error" and "files changed since it was loaded" in output.error, output.error
    llm.load_adapter("changing", directory)
    (reloaded,) = llm.generate([[5, 6, 7, 8]], params, adapters=["changing"])
    llm.load_adapter("all-r8", adapters["all-r8"])
    assert reloaded.token_ids == llm.generate([[5, 6, 7, 8]], params, adapters=["all-r8"])[0].token_ids
