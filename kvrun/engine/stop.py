"""When a request is done, and how much of its text is safe to show while a stop string may still be forming."""

from __future__ import annotations

from kvrun.engine.request import Request


def check_stop(request: Request, eos_token_ids: set[int], previous_text_len: int) -> None:
    """Set finish_reason (and trim a matched stop string) after the newest token was appended."""
    params = request.params
    token_id = request.output_token_ids[-1]
    if token_id in params.stop_token_ids:
        request.finish_reason, request.stop_reason = "stop", token_id
        return
    if token_id in eos_token_ids and not params.ignore_eos:
        request.finish_reason = "stop"
        return
    if params.stop:
        longest = max(len(stop) for stop in params.stop)
        search_from = max(0, previous_text_len - longest + 1)
        hits = [(index, stop) for stop in params.stop if (index := request.text.find(stop, search_from)) >= 0]
        if hits:
            index, stop = min(hits)
            request.text = request.text[:index]
            request.finish_reason, request.stop_reason = "stop", stop
            return
    if len(request.output_token_ids) >= params.max_tokens:
        request.finish_reason = "length"


def visible_text(request: Request, text: str, finished: bool) -> str:
    """While unfinished, hold back a tail that could be the start of a stop string."""
    if finished or not request.params.stop:
        return text
    hold = max(len(stop) for stop in request.params.stop) - 1
    return text[: max(0, len(text) - hold)]
