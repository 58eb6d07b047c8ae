"""One loading loop for every family, driven by the model's own modules.

A checkpoint tensor `<module>.<weight|bias>` lands either in a Projection slice (when <module> is one of the
checkpoint names a Projection packs, beside it) or in the parameter of the same name. The same slice index tells
the LoRA layer which projection and slice an adapter's `<module>.lora_A/B` belongs to, and gives the adapter shape
table (kvrun.runtime.models.manifest), so there is one source of checkpoint naming: the model's modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from kvrun.runtime.layers.linear import Projection
from kvrun.runtime.layers.vocab import EMBEDDING, VocabParallelEmbedding

HEAD_PATH = "lm_head"  # the output layer's module path in every family (kvrun.runtime.models.decoder.CausalLM)

# Buffers some checkpoints carry that kvrun recomputes (rotary tables) or never uses.
_IGNORED_SUFFIXES = (
    ".rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias", ".attention.masked_bias", ".attention.bias",
)  # fmt: skip


def _renamer(model: nn.Module) -> Callable[[str], str]:
    """The model's own module path → checkpoint path renaming (identity for Llama-named families)."""
    return getattr(model, "checkpoint_name", lambda path: path)


def projection_slices(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Checkpoint module path → (path of the Projection holding it, slice name), for every Projection."""
    rename = _renamer(model)
    index = {}
    for path, module in model.named_modules():
        if isinstance(module, Projection):
            parent = path.rpartition(".")[0]
            for slice_name in module.output_slices:
                index[rename(f"{parent}.{slice_name}" if parent else slice_name)] = (path, slice_name)
    return index


def vocab_layers(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Checkpoint module path → (path of the VocabParallelEmbedding, its role there: EMBEDDING or HEAD), for every
    role every vocabulary matrix plays. The output layer's name is the model's `lm_head`, renamed as the checkpoint
    names it, also where the token embedding plays it (tied embeddings: PEFT still adapts `lm_head` as a layer of its
    own). Where the checkpoint names it otherwise (GPT-NeoX's `embed_out`), `lm_head` is accepted too: an adapter's
    module paths are those of the transformers release it was trained with, which may have renamed the module."""
    rename = _renamer(model)
    index = {}
    for path, module in model.named_modules():
        if isinstance(module, VocabParallelEmbedding):
            for role in module.roles:
                names = (rename(path),) if role == EMBEDDING else tuple(dict.fromkeys((rename(HEAD_PATH), HEAD_PATH)))
                index.update(dict.fromkeys(names, (path, role)))
    return index


def expected_checkpoint_names(model: nn.Module) -> list[str]:
    index = projection_slices(model)
    owned = {projection for projection, _ in index.values()}
    names = []
    for checkpoint_module, (projection, _) in index.items():
        module = model.get_submodule(projection)
        names.append(f"{checkpoint_module}.weight")
        if module.bias is not None:
            names.append(f"{checkpoint_module}.bias")
    rename = _renamer(model)
    for name, _ in model.named_parameters():
        if name.rpartition(".")[0] not in owned:
            names.append(rename(name))
    return names


@torch.no_grad()
def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], architecture: str) -> None:
    index = projection_slices(model)
    rename = _renamer(model)
    params = {rename(name): param for name, param in model.named_parameters()}
    tied_head = rename("lm_head.weight") if getattr(model, "lm_head", "absent") is None else None

    def owned(name: str) -> bool:
        return name in params or name.rpartition(".")[0] in index

    # A checkpoint saved from HF's base model (GPT-2's and BLOOM's own, OPT's) names its tensors without the prefix
    # the causal-LM class adds: `h.0.attn.c_attn.weight` for `transformer.h.0.attn.c_attn.weight`.
    prefixes = sorted({path.split(".", 1)[0] for path in [*params, *index] if path.count(".") >= 2})
    loaded: set[str] = set()
    for name, tensor in weights:
        if name.endswith(_IGNORED_SUFFIXES) or name == tied_head:
            continue
        if not owned(name):
            name = next((f"{prefix}.{name}" for prefix in prefixes if owned(f"{prefix}.{name}")), name)
        module_path, _, param_name = name.rpartition(".")
        try:
            if module_path in index:
                projection, slice_name = index[module_path]
                model.get_submodule(projection).load_checkpoint_tensor(param_name, slice_name, tensor)
            elif name in params:
                shard = getattr(params[name], "load_shard", None)  # a parameter split over tensor-parallel ranks
                if shard is not None:
                    tensor = shard(tensor)
                if params[name].shape != tensor.shape:
                    raise ValueError(f"has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}")
                params[name].copy_(tensor)
            else:
                raise ValueError(f"is not a weight of {architecture} as kvrun builds it (is the config right?)")
        except (ValueError, AttributeError) as error:
            raise ValueError(f"checkpoint weight {name!r} {error}") from None
        loaded.add(name)
    missing = [name for name in expected_checkpoint_names(model) if name not in loaded]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:3]}")
    if hasattr(model, "finish_loading"):
        model.finish_loading()
