"""kvrun: serve one base model to many LoRA adapters at once."""

from kvrun.engine.llm import LLM
from kvrun.engine.request import RequestOutput
from kvrun.engine.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
