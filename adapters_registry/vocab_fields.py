"""`adapter_config.json`'s fields for the vocabulary layers: trainable tokens (`trainable_token_indices`) and whole
layer copies (`modules_to_save`), which kvrun serves on the token embedding and the output layer only; the tensor
names PEFT saves for them. Part of adapters_registry.peft_config's one table of what is served."""

from __future__ import annotations

from adapters_registry.errors import AdapterConfigError, UnsupportedConfigError

CONFIG_FILE = "adapter_config.json"
# The token embedding's and output layer's names among the families kvrun serves (an activated LoRA may not target them;
# trainable tokens and modules_to_save may name only them)
EMBEDDING_LAYER_NAMES = ("embed_tokens", "wte", "embed_in", "word_embeddings")
HEAD_LAYER_NAMES = ("lm_head", "embed_out")
VOCAB_LAYER_NAMES = (*EMBEDDING_LAYER_NAMES, *HEAD_LAYER_NAMES)

# Trainable tokens (trainable_token_indices): per layer, the rows of the vocabulary matrix the adapter replaces,
# saved as `<module>.token_adapter.trainable_tokens_delta` [len(indices), width] — the new rows themselves.
TOKEN_ROWS_PART = "token_adapter.trainable_tokens_delta"
# A modules_to_save layer: the adapter's whole copy of it, saved under the layer's own parameter names.
FULL_COPY_PARTS = ("weight", "bias")


def parse_token_indices(config: dict) -> tuple[tuple[str | None, tuple[int, ...]], ...]:
    """trainable_token_indices: a list of token ids (the token embedding's rows), or a map layer name → such a list;
    the layers may be the token embedding and the output layer only."""
    value = config.get("trainable_token_indices")
    if value in (None, [], {}):
        return ()
    entries = value.items() if isinstance(value, dict) else [(None, value)]
    found = []
    for layer, indices in entries:
        where = "trainable_token_indices" + ("" if layer is None else f"[{layer!r}]")
        if layer is not None and (not layer or layer.rsplit(".", 1)[-1] not in VOCAB_LAYER_NAMES):
            raise UnsupportedConfigError(
                f"{CONFIG_FILE}: trainable_token_indices names {layer!r}: trainable tokens are served on the token "
                f"embedding and the output layer only ({', '.join(VOCAB_LAYER_NAMES)})"
            )
        if not isinstance(indices, list) or not indices or not all(type(i) is int and i >= 0 for i in indices):
            raise AdapterConfigError(f"{CONFIG_FILE}: {where} must be a non-empty list of token ids, got {indices!r}")
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        if repeated:
            raise AdapterConfigError(f"{CONFIG_FILE}: {where} lists token id {repeated[0]} more than once")
        found.append((layer, tuple(indices)))
    modules_to_save = config.get("modules_to_save") or ()
    for layer, _ in found:
        if layer is not None and isinstance(modules_to_save, list) and layer in modules_to_save:
            raise UnsupportedConfigError(
                f"{CONFIG_FILE}: {layer!r} is in modules_to_save and in trainable_token_indices, a combination PEFT "
                "refuses"
            )
    return tuple(found)


def parse_modules_to_save(config: dict) -> tuple[str, ...]:
    """modules_to_save: the layers the adapter holds whole copies of; the token embedding and output layer only."""
    value = config.get("modules_to_save")
    if value in (None, []):
        return ()
    if not isinstance(value, list) or not all(isinstance(name, str) and name for name in value):
        raise AdapterConfigError(f"{CONFIG_FILE}: modules_to_save must be a list of module names")
    for name in value:
        if name.rsplit(".", 1)[-1] not in VOCAB_LAYER_NAMES:
            raise UnsupportedConfigError(
                f"{CONFIG_FILE}: modules_to_save names {name!r}: kvrun serves whole per-adapter copies of the token "
                f"embedding and the output layer only ({', '.join(VOCAB_LAYER_NAMES)})"
            )
    return tuple(sorted(set(value)))
