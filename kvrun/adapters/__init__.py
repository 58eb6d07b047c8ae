"""LoRA adapters: parse PEFT checkpoints, keep them in host memory, place them in model slots."""

from kvrun.adapters.peft_format import AdapterError
from kvrun.adapters.ref import AdapterRef

__all__ = ["AdapterError", "AdapterRef"]
