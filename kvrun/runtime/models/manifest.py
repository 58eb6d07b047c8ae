"""The LoRA-targetable modules of a model and their shapes, read off the modules the model builds.

The engine's adapter parser checks adapters against this table; `kvrun model-manifest MODEL` writes it as the JSON
manifest the registry checks pushes against (adapters_registry.base_model), so both enforce the same shapes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from adapters_registry.base_model import MANIFEST_KEY, MANIFEST_VERSION, generic_path
from kvrun.runtime.models.decoder import CausalLM
from kvrun.runtime.models.spec import ModelConfig
from kvrun.runtime.layers.vocab import EMBEDDING
from kvrun.runtime.models.weights import projection_slices, vocab_layers


@dataclass(frozen=True, slots=True)
class LoRATargets:
    architecture: str
    num_layers: int
    # checkpoint module path → (in_features, out_features); a token embedding's are (vocab, width): PEFT's
    # lora_embedding_A [r, vocab] / lora_embedding_B [width, r] have lora_A / lora_B's orientation
    modules: dict[str, tuple[int, int]]
    embeddings: frozenset[str] = frozenset()  # the modules above that are token embeddings
    vocab: frozenset[str] = frozenset()  # the token embeddings and the output layer (PEFT saves their base weights)

    @property
    def leaf_names(self) -> list[str]:
        return sorted({path.rsplit(".", 1)[-1] for path in self.modules})


@functools.lru_cache(maxsize=8)
def lora_targets(config: ModelConfig) -> LoRATargets:
    # Built on the meta device: shapes only, no memory, no weights.
    with torch.device("meta"):
        model = CausalLM(config, backend=None, max_positions=1)
    modules = {}
    for checkpoint_module, (projection, slice_name) in projection_slices(model).items():
        layer = model.get_submodule(projection)
        modules[checkpoint_module] = (layer.in_features, layer.output_slices[slice_name])
    embeddings = set()
    vocab = vocab_layers(model)
    for checkpoint_module, (path, role) in vocab.items():
        layer = model.get_submodule(path)
        shape = (layer.vocab_size, layer.weight.shape[1])
        modules[checkpoint_module] = shape if role == EMBEDDING else shape[::-1]
        if role == EMBEDDING:
            embeddings.add(checkpoint_module)
    return LoRATargets(config.architecture, config.num_layers, modules, frozenset(embeddings), frozenset(vocab))


def manifest(config: ModelConfig) -> dict:
    targets = lora_targets(config)
    generic = {generic_path(path): list(shape) for path, shape in targets.modules.items()}
    return {
        MANIFEST_KEY: MANIFEST_VERSION,
        "architecture": targets.architecture,
        "num_layers": targets.num_layers,
        "modules": dict(sorted(generic.items())),
    }
