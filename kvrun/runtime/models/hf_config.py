"""Reading an HF config.json for a family plug-in: required keys named when missing, HF's defaults when absent,
values kvrun cannot compute refused by name, and rotary settings in both the transformers-4 (`rope_theta` +
`rope_scaling`) and transformers-5 (`rope_parameters`, possibly per layer type) styles.
"""

from __future__ import annotations

from typing import Any

from kvrun.runtime.layers.activation import ACTIVATIONS
from kvrun.runtime.layers.rotary import ROPE_TYPES, RopeSpec
from kvrun.runtime.models.spec import DecoderSpec, ModelConfig

_MISSING = object()


class ModelConfigError(ValueError):
    """A config.json kvrun cannot serve, with the key at fault."""


class HFConfig:
    def __init__(self, raw: dict, architecture: str) -> None:
        self.raw = raw
        self.architecture = architecture

    def error(self, message: str) -> ModelConfigError:
        return ModelConfigError(f"{self.architecture}: {message}")

    def rename_keys(self, names: dict[str, str]) -> None:
        """Read the family's own key names under the standard ones (HF's attribute_map: hidden_size ← n_embd, ...);
        a standard key already present wins."""
        for standard, own in names.items():
            if standard not in self.raw and own in self.raw:
                self.raw[standard] = self.raw[own]

    def has(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str, default: Any = None) -> Any:
        """The value in config.json, or HF's default for this family when the key is absent."""
        return self.raw.get(key, default)

    def require(self, key: str, kind: type = int) -> Any:
        value = self.raw.get(key, _MISSING)
        if value is _MISSING or value is None:
            raise self.error(f"config.json has no {key!r}, which this architecture needs")
        return self._typed(key, value, kind)

    def number(self, key: str, default: Any, kind: type = int) -> Any:
        value = self.raw.get(key)
        return default if value is None else self._typed(key, value, kind)

    def _typed(self, key: str, value: Any, kind: type) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
            raise self.error(f"config.json's {key!r} must be {kind.__name__}, got {value!r}")
        if kind in (int, float) and value <= 0 and key not in ("bos_token_id", "eos_token_id"):
            raise self.error(f"config.json's {key!r} must be positive, got {value!r}")
        return value

    def kv_heads(self, num_heads: int, absent: int | None = None) -> int:
        """num_key_value_heads: null means one per query head; an absent key takes the family's HF default."""
        if "num_key_value_heads" not in self.raw and absent is not None:
            return absent
        return self.number("num_key_value_heads", num_heads)

    def activation(self, *keys: str, default: str) -> str:
        """The first of keys present (e.g. Gemma's hidden_activation before hidden_act), checked against what
        kvrun computes."""
        name = next((self.raw[key] for key in keys if self.raw.get(key) is not None), default)
        if name not in ACTIVATIONS:
            raise self.error(f"{keys[0]}={name!r} is not supported (supported: {', '.join(sorted(ACTIVATIONS))})")
        return name

    def refuse_if(self, condition: bool, message: str) -> None:
        if condition:
            raise self.error(message)

    def token_ids(self, key: str, default: Any) -> tuple[int, ...]:
        value = self.raw.get(key, default)
        if value is None:
            return ()
        return tuple(value) if isinstance(value, list) else (value,)

    def model_config(
        self,
        name: str,
        decoder: DecoderSpec,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        max_position_embeddings: int,
        tie_word_embeddings: bool,
        eos_token_id: int | list[int] | None,
        bos_token_id: int | None,
    ) -> ModelConfig:
        """The generic part every family shares; the defaults passed in are the family's HF defaults."""
        num_layers = self.require("num_hidden_layers")
        if len(decoder.layers) != num_layers:
            raise self.error(f"decoder has {len(decoder.layers)} layer specs for {num_layers} layers")
        if num_heads % num_kv_heads:
            raise self.error(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
        tie = self.get("tie_word_embeddings", tie_word_embeddings)
        # Linear and dynamic-NTK scaling stretch the trained positions by their factor, and YaRN its original context:
        # the context grows with it (a Qwen2.5 config adds YaRN x4 to its 32k positions for 128k).
        contexts = [max_position_embeddings]
        for layer in decoder.layers:
            rope = layer.rope
            if rope is not None and rope.rope_type in ("linear", "dynamic"):
                contexts.append(max_position_embeddings * rope.params["factor"])
            elif rope is not None and rope.rope_type == "yarn" and rope.params.get("factor"):
                original = rope.params.get("original_max_position_embeddings") or max_position_embeddings
                contexts.append(original * rope.params["factor"])
        return ModelConfig(
            architecture=self.architecture,
            name=name,
            vocab_size=self.require("vocab_size"),
            hidden_size=self.require("hidden_size"),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(max(contexts)),
            tie_word_embeddings=bool(tie),
            eos_token_ids=self.token_ids("eos_token_id", eos_token_id),
            bos_token_id=self.get("bos_token_id", bos_token_id),
            decoder=decoder,
        )

    def layer_types(self, default: list[str]) -> list[str]:
        """Per-layer "full_attention" / "sliding_attention", as written or as the family derives it."""
        types = self.raw.get("layer_types") or default
        if len(types) != self.require("num_hidden_layers"):
            raise self.error(f"layer_types has {len(types)} entries for {self.raw['num_hidden_layers']} layers")
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise self.error(f"layer type(s) {unknown} are not supported (full_attention, sliding_attention)")
        return list(types)

    # -- rotary ---------------------------------------------------------------------------------------------------
    def rope(
        self,
        *,
        head_dim: int,
        max_position_embeddings: int,
        default_theta: float = 10000.0,
        layer_type: str | None = None,
        layer_types: tuple[str, ...] = (),
        theta_key: str = "rope_theta",
        original_max_position_embeddings: int | None = None,
        interleaved: bool = False,
        partial_key: str = "partial_rotary_factor",
        default_partial: float = 1.0,
    ) -> RopeSpec:
        """The rotary embedding of one layer type, as transformers standardises it (`rope_scaling` wins over
        `rope_parameters`; theta and partial_rotary_factor may sit at the top level)."""
        params = self.raw.get("rope_scaling") or self.raw.get("rope_parameters") or {}
        if not isinstance(params, dict):
            raise self.error(f"rope parameters must be an object, got {params!r}")
        nested = [key for key in params if key in layer_types]
        if nested:
            params = params.get(layer_type) or {}
        params = dict(params)
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        if rope_type not in ROPE_TYPES:
            raise self.error(f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        theta = params.pop("rope_theta", None) or self.raw.get(theta_key) or default_theta
        partial = params.pop("partial_rotary_factor", None) or self.raw.get(partial_key) or default_partial
        if rope_type in ("llama3", "yarn", "longrope"):
            original = original_max_position_embeddings or params.get("original_max_position_embeddings")
            params["original_max_position_embeddings"] = original or max_position_embeddings
        needed = {"linear": ("factor",), "dynamic": ("factor",), "llama3": ("factor",),
                  "longrope": ("long_factor", "short_factor")}.get(rope_type, ())  # fmt: skip
        for key in needed:
            if params.get(key) is None:
                raise self.error(f"rope type {rope_type!r} needs {key!r} in its rope parameters")
        rotary_dim = int(head_dim * float(partial))
        if rope_type == "longrope":
            for key in ("long_factor", "short_factor"):
                if len(params[key]) != rotary_dim // 2:
                    raise self.error(f"longrope {key} has {len(params[key])} entries, expected {rotary_dim // 2}")
        try:
            return RopeSpec(float(theta), head_dim, rotary_dim, max_position_embeddings, rope_type, params, interleaved)
        except ValueError as error:
            raise self.error(str(error)) from None
