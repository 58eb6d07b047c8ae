"""How many prompt tokens a step may carry beside running decodes, from the step times measured while serving.

A step's token budget (max_num_batched_tokens) bounds its work, not its time: beside 128 decodes of an 8B model on an
H200, a 384-token prompt chunk stretches a 10.8 ms decode step to 27 ms, and every running stream waits that long for
its token. With a step time ratio R, a step that carries prompt tokens beside decodes is sized to take about R times
a decode-only step of as many rows:

    prompt tokens ≤ (R − 1) × decode_time(rows) / cost per prompt token

both learned from the steps themselves (exponential averages): decode_time per power-of-two bucket of rows from the
decode-only steps, the cost per prompt token from the steps with both, each less the decode time of its rows. Until
both are known the budget alone applies. A step always keeps MIN_PROMPT_TOKENS for prompts, so a prompt never
starves behind decodes; with no decode running a step takes the whole budget (no stream waits on it).
"""

from __future__ import annotations

MIN_PROMPT_TOKENS = 32
SMOOTHING = 0.2  # weight of the newest step in each average


def _bucket(rows: int) -> int:
    return 1 << max(0, rows - 1).bit_length()


class StepCosts:
    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self._decode: dict[int, float] = {}  # rows bucket → seconds of a decode-only step
        self._per_token: float | None = None  # seconds a prompt token adds to a step

    def observe(self, decode_rows: int, prompt_tokens: int, seconds: float) -> None:
        """One step's time (device work included: the engine waits for the sampled tokens)."""
        if not decode_rows:
            return
        if not prompt_tokens:
            key = _bucket(decode_rows)
            known = self._decode.get(key)
            self._decode[key] = seconds if known is None else known + SMOOTHING * (seconds - known)
            return
        decode = self.decode_time(decode_rows)
        if decode is None:
            return
        per_token = max(0.0, seconds - decode) / prompt_tokens
        known = self._per_token
        self._per_token = per_token if known is None else known + SMOOTHING * (per_token - known)

    def decode_time(self, rows: int) -> float | None:
        """The measured decode-only step of the nearest bucket of rows (None before any)."""
        if not self._decode:
            return None
        key = _bucket(rows)
        return self._decode[min(self._decode, key=lambda known: (abs(known.bit_length() - key.bit_length()), -known))]

    def prompt_tokens(self, decode_rows: int) -> int | None:
        """The most prompt tokens a step with decode_rows decodes should carry (None: no limit is known)."""
        if not decode_rows or self.ratio <= 0:
            return None
        decode = self.decode_time(decode_rows)
        if decode is None or not self._per_token:
            return None
        return max(MIN_PROMPT_TOKENS, int((self.ratio - 1.0) * decode / self._per_token))
