"""`adapter_config.json`: what a served LoRA may contain, and which modules it targets — one place for both the
registry (push time, no torch) and the kvrun engine (load time), so both accept and refuse with the same words.

PEFT grows new LoraConfig fields with every release, so unknown fields are accepted while they hold their
"off" value (None, False, empty) and rejected as soon as they switch a feature on: a feature the engine
does not implement would otherwise be silently ignored and serve wrong outputs.

Target selection follows PEFT's own rule (`check_target_module_exists`): `exclude_modules` first (a regex string
matched in full, or names matched exactly or as a dotted suffix); then `target_modules` as a regex string matched in
full, or names matched exactly or as a dotted suffix; then `layers_to_transform` keeps only the listed layer indices
(the index after `layers_pattern`, or after the first numbered segment). "all-linear" stands for every linear layer
but the output head; PEFT expands it to full module paths when it saves, and kvrun accepts either form.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from adapters_registry.errors import AdapterConfigError, RankError, UnsupportedConfigError
from adapters_registry.vocab_fields import (  # noqa: F401  (the vocabulary names and parts are read from here too)
    EMBEDDING_LAYER_NAMES, FULL_COPY_PARTS, HEAD_LAYER_NAMES, TOKEN_ROWS_PART, VOCAB_LAYER_NAMES,
    parse_modules_to_save, parse_token_indices,
)  # fmt: skip

CONFIG_FILE = "adapter_config.json"
ALL_LINEAR = "all-linear"

# Fields the engine reads and applies.
_SERVED_FIELDS = {
    "peft_type", "r", "target_modules", "exclude_modules", "lora_alpha", "use_rslora", "bias", "layers_to_transform",
    "layers_pattern", "rank_pattern", "alpha_pattern", "lora_bias", "use_dora", "alora_invocation_tokens",
    "trainable_token_indices", "modules_to_save",
}  # fmt: skip
# Fields that may hold any value: bookkeeping, training-only or initialization-only settings.
_HARMLESS_FIELDS = {
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "lora_dropout", "init_lora_weights", "megatron_core", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "qalora_group_size", "ensure_weight_tying",
    # Describes the base layer's weight layout (GPT-2's Conv1D stores [in, out]); PEFT sets it per module type and
    # stores lora_A [r, in] / lora_B [out, r] either way, so the delta is the same.
    "fan_in_fan_out",
}  # fmt: skip

# What PEFT can save that kvrun does not serve, each refused by name with the reason given here: the registry at push
# and the engine at load read this one table, so both refuse with the same words.
UNSERVED_FIELDS = {
    "layer_replication": "layer_replication changes the base model's layer layout",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
    "use_qalora": "QALoRA (use_qalora) is not supported",
    "megatron_config": "Megatron-parallel LoRA layers (megatron_config) are not supported",
    "velora_config": "the VeLoRA variant (velora_config) is not supported",
    "monteclora_config": "the MonteCLoRA variant (monteclora_config) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "arrow_config": "Arrow routing among LoRA experts (arrow_config) is not supported",
    "kasa_config": "the KaSA variant (kasa_config) is not supported",
}
UNSERVED_BIAS = {
    "all": "bias='all' retrains every bias of the base model, which the engine cannot swap per request; only "
    "bias='none' is served",
    "lora_only": "bias='lora_only' retrains the biases of the adapted base layers, which the engine cannot swap per "
    "request; only bias='none' is served",
}
# target_modules leaves naming layers PEFT adapts with its embedding LoRA that kvrun does not serve: position tables.
UNSERVED_TARGETS = dict.fromkeys(("wpe", "embed_positions"), "LoRA on a position-embedding table is not served")
# peft_type → the method's name: every PEFT method but LoRA changes the model in ways the LoRA kernels do not compute.
UNSERVED_PEFT_TYPES = {
    "LOHA": "LoHa (low-rank Hadamard product)", "LOKR": "LoKr (low-rank Kronecker product)",
    "IA3": "IA3 (learned activation scaling)", "OFT": "OFT (orthogonal fine-tuning)",
    "BOFT": "BOFT (butterfly orthogonal fine-tuning)", "ADALORA": "AdaLoRA (SVD-form LoRA with a learned spectrum)",
    "VERA": "VeRA (shared random projections)", "FOURIERFT": "FourierFT", "HRA": "HRA (Householder reflections)",
    "VBLORA": "VB-LoRA (vector bank)", "XLORA": "X-LoRA (mixture of LoRA experts)", "RANDLORA": "RandLoRA",
    "SHIRA": "SHiRA (sparse high-rank adapters)", "MISS": "MiSS", "ROAD": "RoAd (2D rotations)",
    "C3A": "C3A (circular convolution)", "LN_TUNING": "LN tuning (retrained layer norms)",
    "TRAINABLE_TOKENS": "trainable tokens", "POLY": "Poly (routed adapters)", "PROMPT_TUNING": "prompt tuning",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning", "P_TUNING": "P-tuning", "PREFIX_TUNING": "prefix tuning",
    "ADAPTION_PROMPT": "adaption prompt (LLaMA-Adapter)", "CPT": "context-aware prompt tuning",
}  # fmt: skip


LORA_PARTS = ("lora_A.weight", "lora_B.weight")  # what every LoRA module of a linear layer saves
# What PEFT's embedding LoRA saves instead: lora_embedding_A [r, vocab], lora_embedding_B [hidden, r] (the same
# orientation as lora_A [r, in] / lora_B [out, r], with in = vocab and out = hidden).
EMBEDDING_PARTS = ("lora_embedding_A", "lora_embedding_B")
# PEFT (save_embedding_layers="auto") saves the base weight (and bias) of a targeted embedding or output layer beside
# its LoRA, and loading the adapter writes them back into the model; kvrun serves them when they equal the base
# model's own.
BASE_COPIES = ("base_layer.weight", "base_layer.bias")
# Per-module vectors [out_features] PEFT saves beside lora_A / lora_B, each when its config flag is set:
# saved key suffix → (the flag, what the vector is).
MODULE_VECTORS = {
    "lora_B.bias": ("lora_bias", "a LoRA bias"),
    "lora_magnitude_vector": ("use_dora", "a DoRA magnitude vector"),
}

# Tensors PEFT saves for the features above, for an adapter whose config does not admit to them (hand-edited, or
# saved by an older PEFT): the pattern of the key, and what it is.
_UNSERVED_TENSORS = (
    (r"\.alora_", "an activated-LoRA tensor"),
    (r"\.(hada|lokr)_", "a LoHa/LoKr weight"),
    (r"\.ia3_l", "an IA3 scaling vector"),
    (r"\.oft_", "an OFT rotation"),
)


def unserved_tensor(key: str) -> str | None:
    """What a saved tensor that is no LoRA A/B weight belongs to, when it belongs to a PEFT feature kvrun does not
    serve; None when it is not recognised."""
    return next((what for pattern, what in _UNSERVED_TENSORS if re.search(pattern, key)), None)


@dataclass(frozen=True, slots=True)
class LoraSettings:
    rank: int
    alpha: float
    target_modules: tuple[str, ...] | str  # names/paths, or one regex string (possibly "all-linear")
    use_rslora: bool
    base_model: str | None
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    # PEFT's per-module overrides of r and lora_alpha, in the file's order: (key, value), the key a regex
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    lora_bias: bool = False  # every LoRA module's lora_B has a bias (PEFT saves `<module>.lora_B.bias`)
    use_dora: bool = False  # DoRA: every LoRA module has a magnitude vector (`<module>.lora_magnitude_vector`)
    # Activated LoRA: the adapter applies from the last occurrence of these tokens in the prompt on (docs/adapters.md)
    invocation_tokens: tuple[int, ...] | None = None
    # Trainable tokens: (the layer as trainable_token_indices names it, None for its list form, which means the token
    # embedding; the vocabulary rows the adapter replaces there)
    token_indices: tuple[tuple[str | None, tuple[int, ...]], ...] = ()
    modules_to_save: tuple[str, ...] = ()  # layers the adapter holds whole copies of (token embedding, output layer)

    def token_indices_of(self, module: str, embedding: bool) -> tuple[int, ...] | None:
        """The vocabulary rows this adapter replaces in `module` (a token embedding when `embedding`), or None."""
        for layer, indices in self.token_indices:
            if embedding if layer is None else _matches((layer,), module):
                return indices
        return None

    def saves_full(self, module: str) -> bool:
        """Whether the adapter holds a whole copy of `module` (modules_to_save)."""
        return _matches(self.modules_to_save, module)

    @property
    def module_vectors(self) -> tuple[str, ...]:
        """The MODULE_VECTORS every LoRA module of this adapter has."""
        return tuple(part for part, (flag, _) in MODULE_VECTORS.items() if getattr(self, flag))

    def vector_problem(self, key: str, part: str) -> str | None:
        """Why the saved vector `key` (a MODULE_VECTORS part) does not belong in this adapter, or None."""
        flag, what = MODULE_VECTORS[part]
        if getattr(self, flag):
            return None
        return f"tensor {key!r} is {what}, but adapter_config.json does not set {flag}=true; PEFT would not apply it"

    @staticmethod
    def lora_pair(parts) -> tuple[str, str]:
        """The names of a module's A and B among its saved parts: a linear layer's, or an embedding's."""
        return EMBEDDING_PARTS if EMBEDDING_PARTS[0] in parts else LORA_PARTS

    def module_problem(self, module: str, parts) -> str | None:
        """What LoRA module `module`, saved with tensors `parts`, lacks for this adapter's settings, or None."""
        if any(part in parts for part in EMBEDDING_PARTS):
            if any(part in parts for part in LORA_PARTS):
                return f"module {module!r} has both linear (lora_A/lora_B) and embedding (lora_embedding_A/B) weights"
            if self.use_dora:
                return f"module {module!r}: DoRA (use_dora) on an embedding layer is not served"
            if self.lora_bias:
                return f"module {module!r}: lora_bias on an embedding layer is not served"
            missing = [part for part in EMBEDDING_PARTS if part not in parts]
            return f"module {module!r} has no {missing[0]}" if missing else None
        missing = [part for part in (*LORA_PARTS, *self.module_vectors) if part not in parts]
        if not missing:
            return None
        flag = MODULE_VECTORS[missing[0]][0] if missing[0] in MODULE_VECTORS else None
        because = f" (adapter_config.json sets {flag}=true)" if flag else ""
        return f"module {module!r} has no {missing[0]}{because}"

    @property
    def max_rank(self) -> int:
        """The largest rank any module may have (PEFT's own bound: r and every rank_pattern value)."""
        return max([self.rank, *(rank for _, rank in self.rank_pattern)])

    def rank_of(self, module: str) -> int:
        return _pattern_value(self.rank_pattern, module, self.rank)

    def alpha_of(self, module: str) -> float:
        return _pattern_value(self.alpha_pattern, module, self.alpha)

    def scaling_of(self, module: str) -> float:
        """PEFT's scaling for module: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (patterns applied)."""
        rank = self.rank_of(module)
        return self.alpha_of(module) / (rank**0.5 if self.use_rslora else rank)

    @property
    def target_list(self) -> list[str]:
        """For display and records: the names, or the one pattern."""
        return [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)

    @property
    def all_linear(self) -> bool:
        return isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR

    def selects(self, module: str) -> bool:
        """Whether PEFT puts a LoRA layer on `module` (a base-model module path, e.g. model.layers.0.mlp.up_proj);
        "all-linear" selects every module here, the caller restricting it to the model's linear layers."""
        if self.exclude_modules and _matches(self.exclude_modules, module):
            return False
        if self.all_linear:
            found = True
        elif isinstance(self.target_modules, str):
            found = re.fullmatch(self.target_modules, module) is not None
        else:
            found = _matches(self.target_modules, module)
            if found and self.layers_to_transform is not None:
                index = _layer_index(module, self.layers_pattern)
                found = index is not None and index in self.layers_to_transform
        return found

    def unmatched_targets(self, modules: list[str]) -> list[str]:
        """Targets (names or the pattern) that select none of `modules`."""
        if self.all_linear:
            return []
        if isinstance(self.target_modules, str):
            return [] if any(re.fullmatch(self.target_modules, m) for m in modules) else [self.target_modules]
        return [t for t in self.target_modules if not any(m == t or m.endswith(f".{t}") for m in modules)]


def _matches(names: tuple[str, ...] | str, module: str) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return module in names or any(module.endswith(f".{name}") for name in names)


def _pattern_value(pattern: tuple[tuple[str, object], ...], module: str, default):
    """PEFT's `get_pattern_key`: the first key (in the file's order) that matches the end of the module path, whole
    dotted components only, the key read as a regex; the default when none does."""
    for key, value in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _layer_index(module: str, patterns: tuple[str, ...] | None) -> int | None:
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module))), None)
    return int(match["idx"]) if match else None


def parse_config(data: bytes, *, max_rank: int, rank_limit: str = "the registry's maximum rank") -> LoraSettings:
    """Parse adapter_config.json bytes; raise a ValidationError subclass naming the field."""
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise AdapterConfigError(f"{CONFIG_FILE} is not valid JSON ({error})") from None
    return check_config(config, max_rank=max_rank, rank_limit=rank_limit)


def check_config(config: object, *, max_rank: int, rank_limit: str = "the registry's maximum rank") -> LoraSettings:
    """Check a parsed adapter_config.json; raise a ValidationError subclass naming the field."""
    if not isinstance(config, dict):
        raise AdapterConfigError(f"{CONFIG_FILE} must be a JSON object")
    _check_feature_fields(config)
    rank = config.get("r")
    if type(rank) is not int or rank < 1:
        raise AdapterConfigError(f"{CONFIG_FILE}: r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise RankError(f"{CONFIG_FILE}: r={rank} exceeds {rank_limit} {max_rank}")
    alpha = config.get("lora_alpha", 8)  # PEFT's default
    if not _positive_number(alpha):
        raise AdapterConfigError(f"{CONFIG_FILE}: lora_alpha must be a positive number, got {alpha!r}")
    rank_pattern = _pattern(config, "rank_pattern", lambda value: type(value) is int and value >= 1, "positive integers")
    for key, value in rank_pattern:
        if value > max_rank:
            raise RankError(f"{CONFIG_FILE}: rank_pattern[{key!r}]={value} exceeds {rank_limit} {max_rank}")
    alpha_pattern = _pattern(config, "alpha_pattern", _positive_number, "positive numbers")
    use_rslora, lora_bias, use_dora = _flag(config, "use_rslora"), _flag(config, "lora_bias"), _flag(config, "use_dora")
    if lora_bias and use_dora:
        raise UnsupportedConfigError(f"{CONFIG_FILE}: lora_bias=true with use_dora=true is a combination PEFT refuses")
    invocation_tokens = _invocation_tokens(config)
    if invocation_tokens is not None and use_dora:
        raise UnsupportedConfigError(
            f"{CONFIG_FILE}: alora_invocation_tokens with use_dora=true is a combination PEFT refuses"
        )
    token_indices, modules_to_save = parse_token_indices(config), parse_modules_to_save(config)
    if invocation_tokens is not None and (token_indices or modules_to_save):
        raise UnsupportedConfigError(
            f"{CONFIG_FILE}: alora_invocation_tokens with trainable_token_indices or modules_to_save is not served"
        )
    base_model = config.get("base_model_name_or_path")
    if base_model is not None and not isinstance(base_model, str):
        raise AdapterConfigError(f"{CONFIG_FILE}: base_model_name_or_path must be a string")
    targets = _names_or_pattern(config, "target_modules", required=True)
    for target in targets if isinstance(targets, tuple) else ():
        leaf = target.rsplit(".", 1)[-1]
        reason = UNSERVED_TARGETS.get(leaf)
        if (reason is not None or leaf in VOCAB_LAYER_NAMES) and invocation_tokens is not None:
            # PEFT has no aLoRA variant for embeddings; on the output layer it would need the activation point too
            reason = "activated LoRA (alora_invocation_tokens) on an embedding or output layer is not served"
        if reason is not None:
            raise UnsupportedConfigError(f"{CONFIG_FILE}: target_modules names {target!r}: {reason}")
    for layer in (*modules_to_save, *(layer for layer, _ in token_indices if layer is not None)):
        if isinstance(targets, tuple) and _matches(targets, layer):
            raise UnsupportedConfigError(
                f"{CONFIG_FILE}: {layer!r} is in target_modules and in modules_to_save or trainable_token_indices: "
                "LoRA and a whole copy or trainable tokens of one layer together are not served"
            )
    return LoraSettings(
        rank, float(alpha), targets, use_rslora, base_model or None,
        _names_or_pattern(config, "exclude_modules"), _layers(config), _patterns(config), rank_pattern,
        tuple((key, float(value)) for key, value in alpha_pattern), lora_bias, use_dora, invocation_tokens,
        token_indices, modules_to_save,
    )  # fmt: skip


def _flag(config: dict, field: str) -> bool:
    value = config.get(field, False)
    if type(value) is not bool:
        raise AdapterConfigError(f"{CONFIG_FILE}: {field} must be true or false, got {value!r}")
    return value


def _invocation_tokens(config: dict) -> tuple[int, ...] | None:
    """Activated LoRA's invocation sequence: a non-empty list of token ids, or None (a plain LoRA)."""
    value = config.get("alora_invocation_tokens")
    if value is None or value == []:  # PEFT reads an empty list as "not activated": a plain LoRA
        return None
    if not isinstance(value, list) or not value or not all(type(token) is int and token >= 0 for token in value):
        raise AdapterConfigError(
            f"{CONFIG_FILE}: alora_invocation_tokens must be a non-empty list of token ids, got {value!r}"
        )
    return tuple(value)


def _positive_number(value: object) -> bool:
    return type(value) in (int, float) and 0 < value < float("inf")


def _pattern(config: dict, field: str, valid, what: str) -> tuple[tuple[str, object], ...]:
    value = config.get(field) or {}
    if not isinstance(value, dict):
        raise AdapterConfigError(f"{CONFIG_FILE}: {field} must map module names or patterns to values")
    for key, item in value.items():
        try:
            re.compile(key)
        except re.error as error:
            raise AdapterConfigError(f"{CONFIG_FILE}: {field} key {key!r} is not a valid regex ({error})") from None
        if not valid(item):
            raise AdapterConfigError(f"{CONFIG_FILE}: {field}[{key!r}] must be one of {what}, got {item!r}")
    return tuple(value.items())


def _check_feature_fields(config: dict[str, object]) -> None:
    """Refuse, by name, every method, variant and option in config that the engine would not compute as PEFT does."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        method = UNSERVED_PEFT_TYPES.get(peft_type) if isinstance(peft_type, str) else None
        named = f" ({method})" if method else ""
        raise UnsupportedConfigError(
            f"{CONFIG_FILE}: peft_type is {peft_type!r}{named}; kvrun serves LoRA adapters (peft_type 'LORA') only"
        )
    bias = config.get("bias", "none")
    if bias != "none":
        reason = UNSERVED_BIAS.get(bias, "only bias='none' is served") if isinstance(bias, str) else "only 'none'"
        raise UnsupportedConfigError(f"{CONFIG_FILE}: unsupported bias={bias!r}: {reason}")
    for field, value in config.items():
        if field in _SERVED_FIELDS or field in _HARMLESS_FIELDS or value in (None, False, "", [], {}):
            continue
        reason = UNSERVED_FIELDS.get(field, "this registry does not know the field, so it cannot be served safely")
        raise UnsupportedConfigError(f"{CONFIG_FILE}: unsupported field {field}={value!r}: {reason}")


def _names_or_pattern(config: dict, field: str, required: bool = False) -> tuple[str, ...] | str | None:
    value = config.get(field)
    if value in (None, [], ""):
        if required:
            raise AdapterConfigError(f"{CONFIG_FILE}: {field} must name the modules to adapt (a list or a pattern)")
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as error:
            raise AdapterConfigError(f"{CONFIG_FILE}: {field} pattern {value!r} is not a valid regex ({error})") from None
        return value
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise AdapterConfigError(f"{CONFIG_FILE}: {field} must be a list of module names or one pattern string")
    return tuple(sorted(set(value)))


def _layers(config: dict) -> tuple[int, ...] | None:
    value = config.get("layers_to_transform")
    if value is None or value == []:
        return None
    values = [value] if isinstance(value, int) else value
    if not isinstance(values, list) or not all(type(v) is int and v >= 0 for v in values):
        raise AdapterConfigError(f"{CONFIG_FILE}: layers_to_transform must be a layer index or a list of them")
    return tuple(values)


def _patterns(config: dict) -> tuple[str, ...] | None:
    value = config.get("layers_pattern")
    if not value:
        return None
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise AdapterConfigError(f"{CONFIG_FILE}: layers_pattern must be a name or a list of names")
    return tuple(values)
