"""Validation at push: an adapter directory in, a `ValidatedAdapter` out, or a specific ValidationError.

Everything runs before a single byte is stored, so a rejected push leaves the registry untouched.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from adapters_registry.errors import (
    DtypeError,
    FileTooLargeError,
    MissingFileError,
    RankError,
    TensorNameError,
    TensorShapeError,
    UnsafeFormatError,
    ValidationError,
    WeightMagnitudeError,
)
from adapters_registry.peft_config import (
    BASE_COPIES, CONFIG_FILE, EMBEDDING_LAYER_NAMES, FULL_COPY_PARTS, MODULE_VECTORS, TOKEN_ROWS_PART, LoraSettings,
    parse_config, unserved_tensor,
)  # fmt: skip
from adapters_registry.safetensors_format import TensorInfo, check_finite, decode, find_at_least, parse_header

log = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
SUPPORTED_DTYPES = ("F32", "F16", "BF16")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

# PEFT starts lora_A within +-1/sqrt(in_features) and lora_B at zero; trained adapters and the SVD-based
# initialisations (PiSSA, OLoRA, LoftQ) keep every element within a few tens. A bound of 2**10 leaves ample
# headroom for those and refuses weights blown up by a broken export or a scaling bug (x1e30 passed NaN/Inf
# checks and served degenerate text). A power of two, so the byte scan can test it from exponents alone.
LORA_MAGNITUDE_POWER = 10
LORA_MAGNITUDE_BOUND = float(2**LORA_MAGNITUDE_POWER)

# PEFT's saved keys: the adapter name ("default") is stripped by save_pretrained; the per-module vectors (lora_B.bias,
# lora_magnitude_vector) only with their config flags; an embedding's lora_embedding_A/B; and the base weight and bias
# of a targeted embedding or output layer (peft_config.BASE_COPIES).
_KEY_RE = re.compile(
    r"^base_model\.model\.(?P<module>[A-Za-z0-9_.]+)\."
    r"(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector|lora_embedding_[AB]"
    r"|base_layer\.weight|base_layer\.bias)"
    r"(?:\.weight)?$"
)
# Trainable tokens' rows of a layer, and a modules_to_save layer's whole copy (its own weight and bias names).
_VOCAB_KEY_RE = re.compile(
    rf"^base_model\.model\.(?P<module>[A-Za-z0-9_.]+)\.(?P<part>{re.escape(TOKEN_ROWS_PART)}|weight|bias)$"
)


@dataclass(frozen=True, slots=True)
class Limits:
    """Push limits; a registry guards itself against mistakes (a full model pushed as an adapter)."""

    max_rank: int = 256
    max_weights_bytes: int = 2 * 1024**3
    max_config_bytes: int = 1024**2


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class ValidatedAdapter:
    settings: LoraSettings
    dtype: str
    # module path (e.g. model.layers.0.self_attn.q_proj) -> (lora_A shape [r, in], lora_B shape [out, r])
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]


def read_adapter_dir(directory: str | Path, limits: Limits = DEFAULT_LIMITS) -> dict[str, bytes]:
    """Read the two adapter files from a PEFT `save_pretrained` directory, refusing pickle formats."""
    path = Path(directory)
    if not path.is_dir():
        raise MissingFileError(f"{path}: not a directory")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeFormatError(
            f"{path / pickles[0]}: pickle-based files (.bin/.pt/.pth/.pkl/.ckpt) can execute arbitrary code when "
            "loaded, so the registry accepts safetensors only; save with save_pretrained(safe_serialization=True) "
            "and remove the pickle files"
        )
    files: dict[str, bytes] = {}
    for name, limit in ((CONFIG_FILE, limits.max_config_bytes), (WEIGHTS_FILE, limits.max_weights_bytes)):
        file = path / name
        if not file.is_file():
            raise MissingFileError(f"{file}: missing (a PEFT LoRA adapter directory has {' and '.join(ADAPTER_FILES)})")
        size = file.stat().st_size
        if size > limit:
            raise FileTooLargeError(f"{file}: {size} bytes exceeds the limit of {limit} bytes")
        files[name] = file.read_bytes()
    ignored = sorted(p.name for p in path.iterdir() if p.name not in files)
    if ignored:
        log.info("not pushing extra files in %s: %s", path, ", ".join(ignored))
    return files


def validate_adapter(files: Mapping[str, bytes], limits: Limits = DEFAULT_LIMITS) -> ValidatedAdapter:
    """Check config and weights of an in-memory adapter; raise a ValidationError naming file/key/shape."""
    unexpected = sorted(set(files) - set(ADAPTER_FILES))
    if unexpected:
        raise ValidationError(f"unexpected file {unexpected[0]!r}: an adapter is exactly {' and '.join(ADAPTER_FILES)}")
    for name in ADAPTER_FILES:
        if name not in files:
            raise MissingFileError(f"{name}: missing")
    if len(files[CONFIG_FILE]) > limits.max_config_bytes:
        raise FileTooLargeError(f"{CONFIG_FILE}: exceeds the limit of {limits.max_config_bytes} bytes")
    if len(files[WEIGHTS_FILE]) > limits.max_weights_bytes:
        raise FileTooLargeError(f"{WEIGHTS_FILE}: exceeds the limit of {limits.max_weights_bytes} bytes")
    settings = parse_config(files[CONFIG_FILE], max_rank=limits.max_rank)
    data = files[WEIGHTS_FILE]
    tensors = parse_header(data, WEIGHTS_FILE)
    if not tensors:
        raise TensorNameError(f"{WEIGHTS_FILE}: contains no tensors")
    parts = _module_tensors(tensors, settings)
    _check_vocab_tensors_present(tensors, settings)
    dtype = _common_dtype({key: info for key, info in tensors.items() if _vocab_part(key, settings) is None})
    pairs = {module: tuple(found[part] for part in settings.lora_pair(found)) for module, found in parts.items()}
    for module, (a, b) in sorted(pairs.items()):
        _check_pair_shapes(module, a, b, settings.rank_of(module))
        for part in settings.module_vectors:
            vector = parts[module][part]
            if list(vector.shape) != [b.shape[0]]:
                raise TensorShapeError(
                    f"{WEIGHTS_FILE}: tensor {vector.key!r} has shape {list(vector.shape)}; {part} is [{b.shape[0]}] "
                    f"for {module} (lora_B is {list(b.shape)})"
                )
        for part, expected in zip(BASE_COPIES, ({(a.shape[1], b.shape[0]), (b.shape[0], a.shape[1])}, {(b.shape[0],)})):
            copy = parts[module].get(part)
            if copy is not None and tuple(copy.shape) not in expected:
                raise TensorShapeError(
                    f"{WEIGHTS_FILE}: tensor {copy.key!r} has shape {list(copy.shape)}, which is not a {part} of "
                    f"{module} (its LoRA is {list(a.shape)} / {list(b.shape)})"
                )
    for info in tensors.values():
        _check_values(data, info)
    shapes = {module: (a.shape, b.shape) for module, (a, b) in sorted(pairs.items())}
    return ValidatedAdapter(settings, dtype, shapes)


def check_lora_magnitude(tensor_name: str, max_abs: float) -> None:
    """Refuse a LoRA weight tensor whose largest |value| reaches LORA_MAGNITUDE_BOUND (NaN counts as too large).

    Push validation and kvrun's own adapter loader both call this, so they refuse with the same words.
    """
    if not max_abs < LORA_MAGNITUDE_BOUND:
        raise WeightMagnitudeError(
            f"tensor {tensor_name!r} has max |value| {max_abs:.4g}, at or above {LORA_MAGNITUDE_BOUND:g}, the bound "
            "for a trained LoRA weight; check how these weights were exported or scaled"
        )


def _check_values(data: bytes, info: TensorInfo) -> None:
    """No NaN or Inf, and no element at or above the magnitude bound; one byte scan when all is well."""
    payload = data[info.begin : info.end]
    if find_at_least(info.dtype, payload, LORA_MAGNITUDE_POWER) is None:
        return  # NaN and Inf would have been found too: their exponent is the largest there is
    check_finite(WEIGHTS_FILE, data, info)
    try:
        check_lora_magnitude(info.key, max(map(abs, decode(info.dtype, payload))))
    except WeightMagnitudeError as error:
        raise WeightMagnitudeError(f"{WEIGHTS_FILE}: {error}") from None


def _module_tensors(tensors: dict[str, TensorInfo], settings: LoraSettings) -> dict[str, dict[str, TensorInfo]]:
    """module -> {"lora_A.weight": ..., "lora_B.weight": ..., and the settings' module vectors}."""
    modules: dict[str, dict[str, TensorInfo]] = {}
    for key, info in tensors.items():
        match = _KEY_RE.match(key)
        if match is None and _vocab_part(key, settings) is not None:
            _check_vocab_tensor(info, settings)
            continue
        if match is None:
            raise TensorNameError(_explain_bad_key(key))
        module = match["module"]
        if not settings.selects(module):
            raise TensorNameError(
                f"{WEIGHTS_FILE}: tensor {key!r} is for module {module!r}, which adapter_config.json does not "
                f"target (target_modules {settings.target_list}); PEFT would not apply it"
            )
        part = match["part"]
        problem = settings.vector_problem(key, part) if part in MODULE_VECTORS else None
        if problem is not None:
            raise TensorNameError(f"{WEIGHTS_FILE}: {problem}")
        modules.setdefault(module, {})[part] = info
    for module, found in modules.items():
        problem = settings.module_problem(module, found)
        if problem is not None:
            raise TensorNameError(f"{WEIGHTS_FILE}: {problem}")
    return modules


def _vocab_part(key: str, settings: LoraSettings) -> tuple[str, str] | None:
    """(module, part) of a trainable-token or modules_to_save tensor this adapter's config declares, else None."""
    match = _VOCAB_KEY_RE.match(key)
    if match is None or _KEY_RE.match(key):
        return None
    module, part = match["module"], match["part"]
    embedding = module.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES
    if part == TOKEN_ROWS_PART and settings.token_indices_of(module, embedding) is not None:
        return module, part
    if part in FULL_COPY_PARTS and settings.saves_full(module):
        return module, part
    return None


def _check_vocab_tensors_present(tensors: dict[str, TensorInfo], settings: LoraSettings) -> None:
    found = [part for part in (_vocab_part(key, settings) for key in tensors) if part is not None]
    for name in settings.modules_to_save:
        if not any(part == "weight" and (module == name or module.endswith(f".{name}")) for module, part in found):
            raise TensorNameError(f"modules_to_save names {name!r}, but {WEIGHTS_FILE} has no copy of it")
    if settings.token_indices and not any(part == TOKEN_ROWS_PART for _, part in found):
        raise TensorNameError(f"trainable_token_indices is set, but {WEIGHTS_FILE} holds no trainable-token rows")


def _check_vocab_tensor(info: TensorInfo, settings: LoraSettings) -> None:
    module, part = _vocab_part(info.key, settings)
    dims = 1 if part == "bias" else 2
    if len(info.shape) != dims or 0 in info.shape:
        raise TensorShapeError(f"{WEIGHTS_FILE}: tensor {info.key!r} has shape {list(info.shape)}; expected {dims}-D")
    if part == TOKEN_ROWS_PART:
        indices = settings.token_indices_of(module, module.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES)
        if info.shape[0] != len(indices):
            raise TensorShapeError(
                f"{WEIGHTS_FILE}: tensor {info.key!r} has {info.shape[0]} rows, but trainable_token_indices lists "
                f"{len(indices)} tokens for {module}"
            )


def _explain_bad_key(key: str) -> str:
    prefix = f"{WEIGHTS_FILE}: tensor {key!r}"
    if re.search(r"\.lora_[AB]\.[^.]+\.weight$", key):
        return f"{prefix} carries an adapter name; save with PEFT's save_pretrained, which strips it"
    what = unserved_tensor(key)
    if what is not None:
        return f"{prefix} is {what}, which kvrun does not serve"
    if key.endswith(TOKEN_ROWS_PART):
        return f"{prefix} holds trainable tokens of a layer that trainable_token_indices does not list"
    if _VOCAB_KEY_RE.match(key):
        return f"{prefix} is a whole layer's weight, but adapter_config.json's modules_to_save does not name that layer"
    return f"{prefix} is not a PEFT LoRA weight (expected base_model.model.<module>.lora_A.weight / lora_B.weight)"


def _common_dtype(tensors: dict[str, TensorInfo]) -> str:
    # A base layer's copy keeps the base model's dtype, which PEFT's fp32 adapter weights need not share.
    dtypes = sorted({info.dtype for key, info in tensors.items() if not key.endswith(BASE_COPIES)})
    for info in tensors.values():
        if info.dtype not in SUPPORTED_DTYPES:
            raise DtypeError(
                f"{WEIGHTS_FILE}: tensor {info.key!r} has dtype {info.dtype}; use one of {SUPPORTED_DTYPES}"
            )
    if len(dtypes) > 1:
        raise DtypeError(f"{WEIGHTS_FILE}: tensors mix dtypes {dtypes}; save all LoRA weights in one dtype")
    return dtypes[0]


def _check_pair_shapes(module: str, a: TensorInfo, b: TensorInfo, rank: int) -> None:
    for info in (a, b):
        if len(info.shape) != 2 or 0 in info.shape:
            raise TensorShapeError(f"{WEIGHTS_FILE}: tensor {info.key!r} has shape {list(info.shape)}; expected 2-D")
    if a.shape[0] != rank:
        raise RankError(
            f"{WEIGHTS_FILE}: tensor {a.key!r} has shape {list(a.shape)}, i.e. rank {a.shape[0]}, "
            f"but adapter_config.json says r={rank} for {module} (lora_A is [r, in_features])"
        )
    if b.shape[1] != rank:
        raise RankError(
            f"{WEIGHTS_FILE}: tensor {b.key!r} has shape {list(b.shape)}, i.e. rank {b.shape[1]}, "
            f"but adapter_config.json says r={rank} for {module} (lora_B is [out_features, r])"
        )
