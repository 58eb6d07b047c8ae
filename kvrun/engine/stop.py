"""When a request is done, and how much of its text is safe to show while a stop string may still be forming.

The text functions take plain values, not a Request: the server's side of an engine core process runs them on the
text it detokenizes itself, so its streams match what an engine that makes the text would send, byte for byte.
"""

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
        found = find_stop(request.text, params.stop, previous_text_len)
        if found is not None:
            index, stop = found
            request.text = request.text[:index]
            request.finish_reason, request.stop_reason = "stop", stop
            return
    if len(request.output_token_ids) >= params.max_tokens:
        request.finish_reason = "length"


def find_stop(text: str, stops: tuple[str, ...], previous_text_len: int) -> tuple[int, str] | None:
    """The first stop string that the text past previous_text_len completes (it may start before): (where it
    starts, which one), or None. Earlier text was searched when it arrived."""
    longest = max(len(stop) for stop in stops)
    search_from = max(0, previous_text_len - longest + 1)
    hits = [(index, stop) for stop in stops if (index := text.find(stop, search_from)) >= 0]
    return min(hits) if hits else None


def visible_text(stops: tuple[str, ...], text: str, finished: bool) -> str:
    """While unfinished, hold back a tail that could be the start of a stop string."""
    if finished or not stops:
        return text
    hold = max(len(stop) for stop in stops) - 1
    return text[: max(0, len(text) - hold)]


def text_delta(stops: tuple[str, ...], previous_text: str, text: str, finished: bool) -> tuple[str, str]:
    """What a stream shows after a step that took the text from previous_text to text: (the visible text, the part
    of it that is new)."""
    shown_before = visible_text(stops, previous_text, finished=False)
    shown = visible_text(stops, text, finished)
    return shown, shown[len(shown_before) :]
