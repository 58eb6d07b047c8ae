"""Read and validate a PEFT LoRA checkpoint (adapter_config.json + adapter_model.safetensors) for one base model.

Only safetensors is read: a pickled `.bin`/`.pt` checkpoint can run arbitrary code when loaded, so it is refused.
The config is checked by the same code the registry uses at push time (adapters_registry.peft_config), so both
accept and refuse with the same words; tensors are matched to the model's LoRA-targetable modules, which the
model's own layers declare (kvrun.runtime.models.manifest). Every problem raises AdapterError naming the file, key
or field at fault.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from adapters_registry import check_lora_magnitude
from adapters_registry.errors import ValidationError
from adapters_registry.peft_config import (
    BASE_COPIES, EMBEDDING_PARTS, FULL_COPY_PARTS, LORA_PARTS, MODULE_VECTORS, TOKEN_ROWS_PART, LoraSettings,
    check_config, unserved_tensor,
)  # fmt: skip
from kvrun.adapters.ref import AdapterRef
from kvrun.runtime.models.manifest import lora_targets
from kvrun.runtime.models.spec import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_WEIGHTS_BYTES = 4 * 1024**3
# PEFT saves `base_model.model.<module>.lora_A.weight` (older versions kept the adapter name before `.weight`), the
# per-module vectors `<module>.lora_B.bias` (lora_bias) and `<module>.lora_magnitude_vector` (DoRA), an embedding's
# `<module>.lora_embedding_A` / `_B`, and a targeted embedding or output layer's `<module>.base_layer.weight`.
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>[\w.]+)\."
    r"(?P<name>lora_A|lora_B|lora_magnitude_vector|lora_embedding_A|lora_embedding_B|base_layer)(?:\.default)?"
    r"(?:\.(?P<kind>weight|bias))?$"
)
_UNSUFFIXED = ("lora_magnitude_vector", *EMBEDDING_PARTS)  # saved parameters, not a layer's weight or bias
# Trainable tokens' rows of a vocabulary layer, and a modules_to_save layer's whole copy under its own parameter names.
_VOCAB_KEY = re.compile(
    rf"^(?:base_model\.model\.)?(?P<module>[\w.]+)\.(?P<part>{re.escape(TOKEN_ROWS_PART)}|weight|bias)$"
)


class AdapterError(ValueError):
    """An adapter that cannot be served, with the reason."""


@dataclass(frozen=True, slots=True)
class ParsedAdapter:
    ref: AdapterRef
    # checkpoint module path (e.g. model.layers.0.self_attn.q_proj) → (A [rank, in], B [out, rank]), model dtype
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    # module → PEFT's scaling of its delta where rank_pattern / alpha_pattern give it its own (else ref.scaling)
    scalings: dict[str, float] = field(default_factory=dict)
    # module → lora_B's bias [out] (PEFT's lora_bias), model dtype; empty without lora_bias
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    # module → DoRA's magnitude vector [out], fp32; empty without use_dora
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)
    # (module, part) → the base weight or bias PEFT saved beside a targeted embedding or output layer's LoRA
    # (BASE_COPIES), as saved; the engine checks them against its own and drops them (LoRAManager.parse_path)
    base_copies: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    # vocabulary module (the token embedding's or the output layer's checkpoint name) → (token ids, the rows that
    # replace the matrix's own for them [len(ids), width], model dtype): PEFT's trainable tokens. With tied
    # embeddings the output layer's entry repeats the embedding's where PEFT ties them.
    token_rows: dict[str, tuple[tuple[int, ...], torch.Tensor]] = field(default_factory=dict)
    # vocabulary module → its whole copy {"weight": [vocab, width], "bias": [vocab] where the layer has one}, model
    # dtype: PEFT's modules_to_save
    full_copies: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def scaling(self, module: str) -> float:
        return self.scalings.get(module, self.ref.scaling)

    @property
    def num_bytes(self) -> int:
        vectors = (*self.biases.values(), *self.magnitudes.values(), *(rows for _, rows in self.token_rows.values()))
        vectors += tuple(tensor for copy in self.full_copies.values() for tensor in copy.values())
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values()) + sum(v.nbytes for v in vectors)


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
    try:
        settings = check_config(config, max_rank=max_rank, rank_limit="this server's max_lora_rank")
    except ValidationError as error:
        raise AdapterError(f"adapter {name!r}: {error}") from None
    targets = lora_targets(model)
    unmatched = settings.unmatched_targets(list(targets.modules))
    if unmatched:
        raise AdapterError(
            f"adapter {name!r}: {CONFIG_FILE}: target_modules {unmatched} match no module of {targets.architecture} "
            f"(LoRA-targetable: {', '.join(targets.leaf_names)})"
        )
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as error:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} is not a valid safetensors file ({error})") from None
    parts, extras = _module_tensors(name, tensors, targets, settings)
    tied_vocab = targets.vocab.intersection(parts) or any(settings.saves_full(module) for module in targets.vocab)
    if config.get("ensure_weight_tying") is True and model.tie_word_embeddings and tied_vocab:
        raise AdapterError(
            f"adapter {name!r}: {CONFIG_FILE}: ensure_weight_tying=true with LoRA or modules_to_save on the tied "
            f"embedding or output layer of {targets.architecture} (PEFT then ties the adapter's layers too) is not "
            "served"
        )
    token_rows = _token_rows(name, extras, targets, settings, model, dtype)
    full_copies = {module: {part: tensor.to(dtype) for part, tensor in found.items()}
                   for module, found in extras.items() if TOKEN_ROWS_PART not in found}  # fmt: skip
    for module in [module for module in targets.vocab if settings.saves_full(module)]:
        if module not in full_copies and not _aliased(module, full_copies, targets):
            raise AdapterError(
                f"adapter {name!r}: modules_to_save names {module!r}, but {WEIGHTS_FILE} has no copy of it"
            )
    doubled = [module for module in full_copies if module in parts or module in token_rows]
    if doubled:
        raise AdapterError(
            f"adapter {name!r}: {doubled[0]} has a whole copy (modules_to_save) and LoRA weights or trainable tokens; "
            "PEFT would serve the copy alone"
        )
    weights = {}
    for module, found in parts.items():
        a, b = (found[part] for part in settings.lora_pair(found))
        weights[module] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
    base_copies = {(module, part): tensor for module, found in parts.items() for part, tensor in found.items()
                   if part in BASE_COPIES}  # fmt: skip
    biases = {module: found["lora_B.bias"].to(dtype) for module, found in parts.items() if "lora_B.bias" in found}
    # fp32: DoRA's per-feature scale is computed from it once per slot load, in fp32.
    magnitudes = {module: found["lora_magnitude_vector"].float() for module, found in parts.items()
                  if "lora_magnitude_vector" in found}  # fmt: skip
    leaves = tuple(sorted({module.rsplit(".", 1)[-1] for module in weights}))
    digest = hashlib.sha256(repr(dataclasses.replace(settings, base_model=None)).encode()).hexdigest()
    ref = AdapterRef(name, version, hashlib.sha256(data).hexdigest(), settings.rank, settings.alpha, leaves,
                     settings.use_rslora, digest, settings.invocation_tokens)  # fmt: skip
    scalings = {module: settings.scaling_of(module) for module in weights}
    largest = torch.finfo(dtype).max if dtype.is_floating_point else torch.finfo(torch.float32).max
    for module, scaling in [("", ref.scaling), *scalings.items()]:
        if not math.isfinite(scaling) or abs(scaling) > largest:
            where = f" of {module}" if module else ""
            raise AdapterError(f"{name}: the LoRA scaling{where} (lora_alpha / r) is {scaling!r}, which {dtype} "
                               "cannot hold: check lora_alpha")  # fmt: skip
    scalings = {m: s for m, s in scalings.items() if s != ref.scaling}
    return ParsedAdapter(ref, weights, scalings, biases, magnitudes, base_copies, token_rows, full_copies)


def _aliased(module: str, found: dict, targets) -> bool:
    """Whether another name of the same output layer (lm_head / embed_out) is in found."""
    heads = targets.vocab - targets.embeddings
    return module in heads and any(other in found for other in heads)


def _token_rows(name: str, extras: dict, targets, settings: LoraSettings, model: ModelConfig, dtype: torch.dtype):
    """PEFT's trainable tokens per vocabulary module: the rows saved for each layer trainable_token_indices names
    (its list form names the token embedding); with tied embeddings, the output layer takes the embedding's rows
    unless it has its own (PEFT ties the two layers' rows when their indices agree, saving the embedding's alone)."""
    def fail(message: str) -> AdapterError:
        return AdapterError(f"adapter {name!r}: {message}")

    for layer, _ in settings.token_indices:
        if not any(layer is None and module in targets.embeddings or layer is not None and
                   (module == layer or module.endswith(f".{layer}")) for module in targets.vocab):  # fmt: skip
            raise fail(f"{CONFIG_FILE}: trainable_token_indices names {layer or 'the token embedding'!r}, which is no "
                       f"layer of {targets.architecture} ({', '.join(sorted(targets.vocab))})")  # fmt: skip
    heads = sorted(targets.vocab - targets.embeddings)
    rows = {}
    for module in sorted(targets.vocab):
        indices = settings.token_indices_of(module, module in targets.embeddings)
        if indices is None:
            continue
        saved = extras.get(module, {}).get(TOKEN_ROWS_PART)
        if saved is None:
            # an output layer tied to the embedding (below), or a head saved under its other name (lm_head/embed_out)
            aliased = any(TOKEN_ROWS_PART in extras.get(head, {}) for head in heads)
            if module in heads and (model.tie_word_embeddings or aliased):
                continue
            raise fail(f"trainable_token_indices lists tokens for {module}, but {WEIGHTS_FILE} has no "
                       f"{module}.{TOKEN_ROWS_PART}")  # fmt: skip
        if max(indices) >= model.vocab_size:
            raise fail(f"{CONFIG_FILE}: trainable_token_indices for {module} lists token id {max(indices)}, outside "
                       f"the vocabulary of {model.vocab_size} tokens")  # fmt: skip
        if saved.shape[0] != len(indices):
            raise fail(f"{WEIGHTS_FILE}: {module}.{TOKEN_ROWS_PART} has {saved.shape[0]} rows, but "
                       f"trainable_token_indices lists {len(indices)} tokens for it")  # fmt: skip
        rows[module] = (indices, saved.to(dtype).contiguous())
    embedding = next((module for module in rows if module in targets.embeddings), None)
    if model.tie_word_embeddings and embedding is not None and not any(head in rows for head in heads):
        rows.update(dict.fromkeys(heads, rows[embedding]))
    return rows


def _module_tensors(name: str, tensors: dict, targets, settings) -> tuple[dict, dict]:
    """(module → {"lora_A.weight": [rank, in], "lora_B.weight": [out, rank], and each of the settings' module vectors
    (adapters_registry.peft_config.MODULE_VECTORS): [out]}, vocabulary module → {TOKEN_ROWS_PART: [n, width]} or its
    whole copy {"weight": ..., "bias": ...})."""
    def fail(message: str) -> AdapterError:
        return AdapterError(f"adapter {name!r}: {message}")

    sides: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        try:
            vocab = _vocab_tensor(key, tensor, targets, settings) if match is None else None
        except AdapterError as error:
            raise fail(str(error)) from None
        if vocab is not None:
            problem = _tensor_problem(key, tensor)
            if problem is not None:
                raise fail(problem)
            extras.setdefault(vocab[0], {})[vocab[1]] = tensor
            continue
        if match is None:
            what = unserved_tensor(key)
            if what is not None:
                raise fail(f"{WEIGHTS_FILE}: tensor {key!r} is {what}, which kvrun does not serve")
            raise fail(f"unexpected tensor {key!r} in {WEIGHTS_FILE} (not a LoRA A/B weight)")
        module = match["module"]
        part = match["name"] if match["name"] in _UNSUFFIXED else f"{match['name']}.{match['kind']}"
        if part not in (*LORA_PARTS, *EMBEDDING_PARTS, *BASE_COPIES, *MODULE_VECTORS):
            raise fail(f"unexpected tensor {key!r} in {WEIGHTS_FILE} (not a LoRA weight PEFT saves)")
        if module not in targets.modules:
            raise fail(
                f"tensor {key!r} is for module {module!r}, which is not a LoRA-targetable module of "
                f"{targets.architecture} ({', '.join(targets.leaf_names)}; {targets.num_layers} layers)"
            )
        if not settings.selects(module):
            raise fail(
                f"{WEIGHTS_FILE}: tensor {key!r} is for module {module!r}, which adapter_config.json does not "
                f"target (target_modules {settings.target_list}); PEFT would not apply it"
            )
        problem = settings.vector_problem(key, part) if part in MODULE_VECTORS else None
        if problem is not None:
            raise fail(f"{WEIGHTS_FILE}: {problem}")
        problem = _tensor_problem(key, tensor, values=False)
        if problem is not None:
            raise fail(problem)
        problem = _kind_problem(module, part, targets, settings)
        if problem is not None:
            raise fail(f"{WEIGHTS_FILE}: tensor {key!r}: {problem}")
        in_features, out_features = targets.modules[module]
        rank = settings.rank_of(module)
        vocab_shape = (in_features, out_features) if module in targets.embeddings else (out_features, in_features)
        shapes = {"lora_A.weight": (rank, in_features), "lora_B.weight": (out_features, rank),
                  BASE_COPIES[0]: vocab_shape, BASE_COPIES[1]: vocab_shape[:1]}  # fmt: skip
        shapes.update(zip(EMBEDDING_PARTS, (shapes["lora_A.weight"], shapes["lora_B.weight"])))
        expected = shapes.get(part, (out_features,))
        if tuple(tensor.shape) != expected:
            raise fail(f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {expected} (rank {rank}, {module})")
        problem = _tensor_problem(key, tensor, dtype=False)
        if problem is not None:
            raise fail(problem)
        sides.setdefault(module, {})[part] = tensor
    if not sides and not extras:
        raise fail(f"{WEIGHTS_FILE} holds no LoRA weights")
    for module, found in sides.items():
        problem = settings.module_problem(module, found)
        if problem is not None:
            raise fail(problem)
    return sides, extras


def _tensor_problem(key: str, tensor: torch.Tensor, dtype: bool = True, values: bool = True) -> str | None:
    if dtype and tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"tensor {key!r} has dtype {tensor.dtype} (fp32/fp16/bf16 only)"
    if not values:
        return None
    if not torch.isfinite(tensor).all():
        return f"tensor {key!r} contains NaN or Inf"
    try:
        check_lora_magnitude(key, float(tensor.abs().max()) if tensor.numel() else 0.0)
    except ValidationError as error:
        return str(error)
    return None


def _vocab_tensor(key: str, tensor: torch.Tensor, targets, settings: LoraSettings) -> tuple[str, str] | None:
    """(module, part) of a trainable-token or modules_to_save tensor its config declares; None for any other key.
    Raises AdapterError when such a tensor does not fit the layer."""
    match = _VOCAB_KEY.match(key)
    if match is None:
        return None
    module, part = match["module"], match["part"]
    if part == TOKEN_ROWS_PART:
        declared = settings.token_indices_of(module, module in targets.embeddings) is not None
    else:
        declared = settings.saves_full(module)
    if not declared:
        return None
    if module not in targets.vocab:
        raise AdapterError(
            f"tensor {key!r} is for module {module!r}, which is not a token embedding or output layer of "
            f"{targets.architecture} ({', '.join(sorted(targets.vocab))})"
        )
    in_features, out_features = targets.modules[module]
    vocab, width = (in_features, out_features) if module in targets.embeddings else (out_features, in_features)
    expected = {"weight": (vocab, width), "bias": (vocab,)}.get(part, (tensor.shape[0] if tensor.dim() else 0, width))
    if tuple(tensor.shape) != expected:
        raise AdapterError(f"{WEIGHTS_FILE}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {expected}")
    return module, part


def _kind_problem(module: str, part: str, targets, settings) -> str | None:
    """Why `part` does not belong to `module` as PEFT adapts that kind of layer, or None."""
    if module in targets.vocab and settings.all_linear:
        return f"{module} is an embedding or output layer, which target_modules='all-linear' leaves out in PEFT"
    if part in BASE_COPIES and module not in targets.vocab:
        return f"PEFT saves a base layer's weight only beside an embedding or output layer's LoRA, not {module}"
    embedding = module in targets.embeddings
    if part in EMBEDDING_PARTS and not embedding:
        return f"{part} is an embedding's LoRA weight, but {module} is a linear layer (lora_A / lora_B)"
    if part in LORA_PARTS and embedding:
        return f"{module} is a token embedding: PEFT saves lora_embedding_A / lora_embedding_B for it"
    return None
