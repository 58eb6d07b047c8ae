"""Read and validate a PEFT LoRA checkpoint (adapter_config.json + adapter_model.safetensors).

Only safetensors is read: a pickled `.bin`/`.pt` checkpoint can run arbitrary code when loaded, so it is refused.
Every problem raises AdapterError naming the file, key or field at fault.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from kvrun.adapters.ref import AdapterRef
from kvrun.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_WEIGHTS_BYTES = 4 * 1024**3
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$"
)


class AdapterError(ValueError):
    """An adapter that cannot be served, with the reason."""


@dataclass(frozen=True, slots=True)
class ParsedAdapter:
    ref: AdapterRef
    # (layer, module) → (A [rank, in_features], B [out_features, rank]) in the model's dtype
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def num_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def module_shapes(model: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-targetable module of a Llama-family layer."""
    q_size, kv_size = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    hidden, intermediate = model.hidden_size, model.intermediate_size
    return {
        "q_proj": (hidden, q_size),
        "k_proj": (hidden, kv_size),
        "v_proj": (hidden, kv_size),
        "o_proj": (q_size, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }


def load_peft_adapter(
    path: str | Path, name: str, model: ModelConfig, max_rank: int, dtype: torch.dtype, version: int = 0
) -> ParsedAdapter:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise AdapterError(f"adapter {name!r}: {directory} is not a directory")
    config = read_adapter_config(directory / CONFIG_FILE, name)
    data = read_weights_file(directory, name)
    return parse_adapter(name, config, data, model, max_rank, dtype, version)


def read_adapter_config(path: Path, name: str) -> dict:
    if not path.is_file():
        raise AdapterError(f"adapter {name!r}: {path.name} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterError(f"adapter {name!r}: {path.name} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: {path.name} must hold a JSON object")
    return config


def read_weights_file(directory: Path, name: str) -> bytes:
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise AdapterError(
                f"adapter {name!r}: only {WEIGHTS_FILE} is accepted; {pickled[0]} is a pickle checkpoint, which can "
                "run code when loaded (re-save with safe_serialization=True)"
            )
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} is missing")
    size = weights.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} is {size} bytes, over the {MAX_WEIGHTS_BYTES} limit")
    return weights.read_bytes()


def parse_adapter(
    name: str, config: dict, data: bytes, model: ModelConfig, max_rank: int, dtype: torch.dtype, version: int = 0
) -> ParsedAdapter:
    rank, alpha, use_rslora = _check_config(name, config, max_rank)
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as error:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} is not a valid safetensors file ({error})") from None
    pairs = _pair_tensors(name, tensors, model, rank)
    weights = {key: (a.to(dtype).contiguous(), b.to(dtype).contiguous()) for key, (a, b) in pairs.items()}
    modules = tuple(sorted({module for _, module in weights}, key=SUPPORTED_MODULES.index))
    ref = AdapterRef(name, version, hashlib.sha256(data).hexdigest(), rank, alpha, modules, use_rslora)
    return ParsedAdapter(ref, weights)


def _check_config(name: str, config: dict, max_rank: int) -> tuple[int, float, bool]:
    def fail(message: str) -> AdapterError:
        return AdapterError(f"adapter {name!r}: {CONFIG_FILE}: {message}")

    if config.get("peft_type", "LORA") != "LORA":
        raise fail(f"peft_type {config['peft_type']!r} is not supported (LORA only)")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise fail(f"r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise fail(f"rank {rank} is above this server's max_lora_rank {max_rank}")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise fail(f"lora_alpha must be a positive number, got {alpha!r}")
    for field, why in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out layouts")):
        if config.get(field):
            raise fail(f"{field}=true: {why} is not supported")
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            raise fail(f"{field} is not supported (one rank and alpha per adapter)")
    if config.get("modules_to_save"):
        raise fail(f"modules_to_save {config['modules_to_save']!r} is not supported (LoRA weights only)")
    if config.get("bias", "none") != "none":
        raise fail(f"bias={config['bias']!r} is not supported (bias='none' only)")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(set(targets) - set(SUPPORTED_MODULES))
        if unknown:
            raise fail(f"target module(s) {unknown} are not supported (supported: {', '.join(SUPPORTED_MODULES)})")
    return rank, float(alpha), bool(config.get("use_rslora", False))


def _pair_tensors(name: str, tensors: dict, model: ModelConfig, rank: int) -> dict:
    shapes = module_shapes(model)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"adapter {name!r}: unexpected tensor {key!r} (not a LoRA A/B weight of a decoder layer)")
        layer, module, side = int(match[1]), match[2], match[3]
        if module not in shapes:
            raise AdapterError(f"adapter {name!r}: tensor {key!r} targets {module!r}, which is not supported")
        if layer >= model.num_layers:
            raise AdapterError(f"adapter {name!r}: tensor {key!r} is for layer {layer}; the model has {model.num_layers}")
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise AdapterError(f"adapter {name!r}: tensor {key!r} has dtype {tensor.dtype} (fp32/fp16/bf16 only)")
        in_features, out_features = shapes[module]
        expected = (rank, in_features) if side == "A" else (out_features, rank)
        if tuple(tensor.shape) != expected:
            raise AdapterError(
                f"adapter {name!r}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {expected} "
                f"(rank {rank}, {module} of the base model)"
            )
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"adapter {name!r}: tensor {key!r} contains NaN or Inf")
        pairs.setdefault((layer, module), {})[side] = tensor
    if not pairs:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} holds no LoRA weights")
    for (layer, module), sides in pairs.items():
        if len(sides) != 2:
            missing = "B" if "A" in sides else "A"
            raise AdapterError(f"adapter {name!r}: layer {layer} {module} has no lora_{missing} weight")
    return {key: (sides["A"], sides["B"]) for key, sides in pairs.items()}
