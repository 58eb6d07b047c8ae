"""Text-level behaviour on the real bundled SmolLM2: streaming deltas, stop strings, EOS, chat."""

from __future__ import annotations

from kvrun import SamplingParams


def test_streamed_deltas_add_up_to_the_final_text(bundled_llm):
    engine = bundled_llm.engine
    request = engine.add_request("Once upon a time", SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    pieces, final = [], None
    while engine.has_unfinished():
        for output in engine.step():
            pieces.append(output.new_text)
            final = output
    assert final.request_id == request.request_id and final.finished
    assert "".join(pieces) == final.text
    assert final.text == bundled_llm.tokenizer.decode(final.token_ids, skip_special_tokens=True)


def test_stop_string_truncates_and_reports_it(bundled_llm):
    prompt = "Count: 1, 2, 3, 4,"
    free = bundled_llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    assert " 7" in free.text
    stopped = bundled_llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0, stop=[" 7"]))[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == " 7"
    assert stopped.text == free.text[: free.text.index(" 7")]


def test_chat_ends_at_eos(bundled_llm):
    output = bundled_llm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(max_tokens=64, temperature=0))[0]
    assert output.finish_reason == "stop"
    assert output.token_ids[-1] == bundled_llm.tokenizer.eos_token_id
    assert output.text and "<|im_end|>" not in output.text
