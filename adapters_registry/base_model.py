"""Expected LoRA shapes from a base model's Hugging Face `config.json` (Llama-family projection names).

The registry stores base configs by name (`kvrun-adapters base set NAME config.json`); when a pushed
adapter names a known base model, every lora_A/lora_B must fit that model's projections. Modules the table
does not know are left unchecked rather than rejected, so adapters for other architectures still push.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from adapters_registry.errors import BaseModelMismatchError, UsageError

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True, slots=True)
class BaseShapes:
    name: str
    num_layers: int
    features: dict[str, tuple[int, int]]  # module leaf name -> (in_features, out_features)

    def check_adapter(self, shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        for module, (a_shape, b_shape) in shapes.items():
            self.check(module, a_shape, b_shape)

    def check(self, module: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> None:
        """Raise BaseModelMismatchError if `module`'s lora_A [r, in] / lora_B [out, r] do not fit."""
        layer = _LAYER_RE.search(f".{module}.")
        if layer and int(layer.group(1)) >= self.num_layers:
            raise BaseModelMismatchError(
                f"module {module!r}: layer {layer.group(1)} does not exist in base model "
                f"{self.name!r} ({self.num_layers} layers)"
            )
        leaf = module.rsplit(".", 1)[-1]
        if leaf not in self.features:
            return
        in_features, out_features = self.features[leaf]
        if a_shape[1] != in_features or b_shape[0] != out_features:
            raise BaseModelMismatchError(
                f"module {module!r}: lora_A {list(a_shape)} / lora_B {list(b_shape)} do not fit {leaf} of base "
                f"model {self.name!r} (expected lora_A [r, {in_features}], lora_B [{out_features}, r])"
            )


def parse_base_config(data: bytes | dict[str, object], name: str) -> dict[str, object]:
    """Load a base config (bytes of config.json or a dict) and check the fields shapes are derived from."""
    if isinstance(data, bytes):
        try:
            data = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise UsageError(f"base model config for {name!r} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise UsageError(f"base model config for {name!r} must be a JSON object")
    for field in ("hidden_size", "num_attention_heads", "num_hidden_layers"):
        if type(data.get(field)) is not int or data[field] < 1:
            raise UsageError(f"base model config for {name!r} lacks a positive integer {field!r}")
    return data


def base_shapes(config: dict[str, object], name: str) -> BaseShapes:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    intermediate = int(config.get("intermediate_size") or 4 * hidden)
    features = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }
    return BaseShapes(name, int(config["num_hidden_layers"]), features)
