"""Malformed adapters are rejected at push with a specific error naming the problem, and store nothing."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from adapters_registry import LORA_MAGNITUDE_BOUND, AdapterStore, Limits, check_lora_magnitude, errors, open_store
from tests.adapters_registry.conftest import AdapterFactory, assert_empty, read_tensors, write_tensors
from tests.adapters_registry.test_cli import assert_one_line_error, run_cli

A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def edit_config(**changes: object) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        path = directory / "adapter_config.json"
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))

    return edit


def edit_tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        tensors = read_tensors(directory)
        change(tensors)
        write_tensors(directory, tensors)

    return edit


def write_weights_bytes(data: bytes) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        (directory / "adapter_model.safetensors").write_bytes(data)

    return edit


def raw_safetensors(header: dict[str, object], data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + data


def set_element(key: str, value: float, dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        for name in tensors:
            tensors[name] = tensors[name].to(dtype)
        tensors[key] = tensors[key].clone()
        tensors[key][1, 2] = value

    return change


def replace_tensor(key: str, tensor: torch.Tensor) -> Callable[[Path], None]:
    return edit_tensors(lambda tensors: tensors.__setitem__(key, tensor))


def rename_tensor(old: str, new: str) -> Callable[[Path], None]:
    return edit_tensors(lambda tensors: tensors.__setitem__(new, tensors.pop(old)))


def write_file(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda directory: (directory / name).write_bytes(data)  # type: ignore[return-value]


def remove_file(name: str) -> Callable[[Path], None]:
    return lambda directory: (directory / name).unlink()


def huge_then_nan(tensors: dict[str, torch.Tensor]) -> None:
    set_element(A_KEY, 5e4, HALF)(tensors)  # element 18: far above the magnitude bound, but finite
    tensors[A_KEY][3, 3] = float("nan")  # element 51: reported, since NaN is the worse problem


HALF = torch.float16
OVERLAPPING = {
    A_KEY: {"dtype": "F16", "shape": [4, 2], "data_offsets": [0, 16]},
    B_KEY: {"dtype": "F16", "shape": [2, 4], "data_offsets": [8, 24]},
}
SHORT_DATA = {A_KEY: {"dtype": "F16", "shape": [4, 4], "data_offsets": [0, 8]}}
EMBEDDING_KEY = "base_model.model.model.embed_tokens.lora_embedding_A"
E = errors

# case -> (how to break a good adapter, the error expected, a fragment of its message)
MALFORMED: dict[str, tuple[Callable[[Path], None], type[errors.ValidationError], str]] = {
    "pickle weights": (
        write_file("adapter_model.bin", b"\x80\x04"),
        E.UnsafeFormatError,
        "adapter_model.bin: pickle-based",
    ),
    "pickle training args": (write_file("training_args.pt", b"x"), E.UnsafeFormatError, "can execute arbitrary code"),
    "missing config": (remove_file("adapter_config.json"), E.MissingFileError, "adapter_config.json: missing"),
    "missing weights": (remove_file("adapter_model.safetensors"), E.MissingFileError, "safetensors: missing"),
    "config not json": (write_file("adapter_config.json", b"{r: 4"), E.AdapterConfigError, "not valid JSON"),
    "not lora": (edit_config(peft_type="IA3"), E.UnsupportedConfigError, "peft_type is 'IA3'"),
    "dora without magnitudes": (
        edit_config(use_dora=True),
        E.TensorNameError,
        "has no lora_magnitude_vector (adapter_config.json sets use_dora=true)",
    ),
    "modules_to_save without the copy": (
        edit_config(modules_to_save=["lm_head"]),
        E.TensorNameError,
        "modules_to_save names 'lm_head', but adapter_model.safetensors has no copy of it",
    ),
    "modules_to_save of another layer": (
        edit_config(modules_to_save=["score"]),
        E.UnsupportedConfigError,
        "kvrun serves whole per-adapter copies of the token embedding and the output layer only",
    ),
    "trainable token twice": (
        edit_config(trainable_token_indices=[3, 3]), E.AdapterConfigError, "lists token id 3 more than once"
    ),
    "trainable tokens of a projection": (
        edit_config(trainable_token_indices={"q_proj": [3]}),
        E.UnsupportedConfigError,
        "trainable tokens are served on the token embedding and the output layer only",
    ),
    "trainable tokens without their rows": (
        edit_config(trainable_token_indices=[3, 4]),
        E.TensorNameError,
        "trainable_token_indices is set, but adapter_model.safetensors holds no trainable-token rows",
    ),
    "alora with dora": (
        edit_config(use_dora=True, alora_invocation_tokens=[5, 6]),
        E.UnsupportedConfigError,
        "alora_invocation_tokens with use_dora=true is a combination PEFT refuses",
    ),
    "alora on lm_head": (
        edit_config(target_modules=["q_proj", "lm_head"], alora_invocation_tokens=[5, 6]),
        E.UnsupportedConfigError,
        "target_modules names 'lm_head': activated LoRA (alora_invocation_tokens) on an embedding or output layer",
    ),
    "alora tokens not ids": (
        edit_config(alora_invocation_tokens=[5, "six"]),
        E.AdapterConfigError,
        "alora_invocation_tokens must be a non-empty list of token ids, got [5, 'six']",
    ),
    "rank_pattern mismatch": (
        edit_config(rank_pattern={"v_proj": 2, "q_proj": 8}),
        E.RankError,
        f"'{A_KEY}' has shape [4, 16], i.e. rank 4, but adapter_config.json says r=8 for model.layers.0.self_attn.q_proj",
    ),
    "rank_pattern over max": (
        edit_config(rank_pattern={"q_proj": 512}),
        E.RankError,
        "rank_pattern['q_proj']=512 exceeds the registry's maximum rank 256",
    ),
    "rank_pattern zero": (edit_config(rank_pattern={"q_proj": 0}), E.AdapterConfigError, "rank_pattern['q_proj']"),
    "rank_pattern list": (edit_config(rank_pattern=["q_proj"]), E.AdapterConfigError, "rank_pattern must map"),
    "alpha_pattern bad regex": (edit_config(alpha_pattern={"(*": 4}), E.AdapterConfigError, "not a valid regex"),
    "alpha_pattern string": (edit_config(alpha_pattern={"q_proj": "8"}), E.AdapterConfigError, "positive numbers"),
    "unknown field": (edit_config(use_magic=True), E.UnsupportedConfigError, "unsupported field use_magic=True"),
    "trained bias": (edit_config(bias="all"), E.UnsupportedConfigError, "bias='all'"),
    "bad regex targets": (edit_config(target_modules="(*proj"), E.AdapterConfigError, "is not a valid regex"),
    "rank zero": (edit_config(r=0), E.AdapterConfigError, "r must be a positive integer, got 0"),
    "rank too high": (edit_config(r=512), E.RankError, "r=512 exceeds the registry's maximum rank 256"),
    "rank mismatch A": (edit_config(r=8), E.RankError, f"tensor '{A_KEY}' has shape [4, 16], i.e. rank 4"),
    "rank mismatch B": (
        replace_tensor(B_KEY, torch.zeros(16, 5, dtype=HALF)),
        E.RankError,
        f"'{B_KEY}' has shape [16, 5], i.e. rank 5",
    ),
    "3-D tensor": (
        replace_tensor(A_KEY, torch.zeros(4, 16, 1, dtype=HALF)),
        E.TensorShapeError,
        "[4, 16, 1]; expected 2-D",
    ),
    "key without prefix": (
        rename_tensor(A_KEY, "model.q_proj.lora_A.weight"),
        E.TensorNameError,
        "is not a PEFT LoRA weight",
    ),
    "key with adapter name": (
        rename_tensor(A_KEY, A_KEY.replace("lora_A.", "lora_A.default.")),
        E.TensorNameError,
        "carries an adapter name",
    ),
    "missing lora_B": (
        edit_tensors(lambda t: t.pop(B_KEY)),
        E.TensorNameError,
        "'model.layers.0.self_attn.q_proj' has no lora_B",
    ),
    "untargeted module": (
        edit_config(target_modules=["v_proj"]),
        E.TensorNameError,
        "does not target (target_modules ['v_proj'])",
    ),
    "embedding lora not targeted": (
        replace_tensor(EMBEDDING_KEY, torch.zeros(4, 8, dtype=HALF)),
        E.TensorNameError,
        "is for module 'model.embed_tokens', which adapter_config.json does not target",
    ),
    "lora bias without lora_bias": (
        replace_tensor(B_KEY.replace(".weight", ".bias"), torch.zeros(16, dtype=HALF)),
        E.TensorNameError,
        "is a LoRA bias, but adapter_config.json does not set lora_bias=true",
    ),
    "lora_bias without a bias": (
        edit_config(lora_bias=True),
        E.TensorNameError,
        "has no lora_B.bias (adapter_config.json sets lora_bias=true)",
    ),
    "lora_bias not a flag": (edit_config(lora_bias="yes"), E.AdapterConfigError, "lora_bias must be true or false"),
    "dora with lora_bias": (
        edit_config(use_dora=True, lora_bias=True), E.UnsupportedConfigError, "a combination PEFT refuses"
    ),
    "dora vector without use_dora": (
        replace_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", torch.ones(16)),
        E.TensorNameError,
        "is a DoRA magnitude vector, but adapter_config.json does not set use_dora=true",
    ),
    "nan f16": (
        edit_tensors(set_element(A_KEY, float("nan"), HALF)),
        E.NonFiniteError,
        f"'{A_KEY}' contains nan at element 18",
    ),
    "inf bf16": (
        edit_tensors(set_element(B_KEY, float("inf"), torch.bfloat16)),
        E.NonFiniteError,
        "contains inf at element 6",
    ),
    "-inf f32": (
        edit_tensors(set_element(A_KEY, float("-inf"), torch.float32)),
        E.NonFiniteError,
        "contains -inf at element 18",
    ),
    "weights scaled by 1e30": (
        edit_tensors(lambda tensors: tensors.update({k: t.float() * 1e30 for k, t in tensors.items()})),
        E.WeightMagnitudeError,
        "has max |value| ",
    ),
    "one huge f32 weight": (
        edit_tensors(set_element(B_KEY, -3e30, torch.float32)),
        E.WeightMagnitudeError,
        f"adapter_model.safetensors: tensor '{B_KEY}' has max |value| 3e+30, at or above 1024, the bound for a "
        "trained LoRA weight",
    ),
    "huge bf16 weight": (
        edit_tensors(set_element(A_KEY, 1e30, torch.bfloat16)),
        E.WeightMagnitudeError,
        f"tensor '{A_KEY}' has max |value| 1e+30, at or above 1024",
    ),
    "large f16 weight": (
        edit_tensors(set_element(A_KEY, -2000.0, HALF)),
        E.WeightMagnitudeError,
        f"tensor '{A_KEY}' has max |value| 2000, at or above 1024",
    ),
    "weight exactly at the bound": (
        edit_tensors(set_element(B_KEY, 1024.0, torch.float32)),
        E.WeightMagnitudeError,
        "has max |value| 1024, at or above 1024",
    ),
    "nan after a huge weight": (
        edit_tensors(huge_then_nan),
        E.NonFiniteError,
        f"'{A_KEY}' contains nan at element 51",
    ),
    "integer dtype": (replace_tensor(A_KEY, torch.zeros(4, 16, dtype=torch.int32)), E.DtypeError, "has dtype I32"),
    "mixed dtypes": (replace_tensor(A_KEY, torch.zeros(4, 16)), E.DtypeError, "mix dtypes ['F16', 'F32']"),
    "truncated file": (write_weights_bytes(b"\x10\x00"), E.SafetensorsFormatError, "too short"),
    "header past end": (
        write_weights_bytes((10**6).to_bytes(8, "little") + b"{}"),
        E.SafetensorsFormatError,
        "exceeds the file size",
    ),
    "header not json": (
        write_weights_bytes((4).to_bytes(8, "little") + b"{{{{"),
        E.SafetensorsFormatError,
        "not valid JSON",
    ),
    "overlapping data": (
        write_weights_bytes(raw_safetensors(OVERLAPPING, bytes(24))),
        E.SafetensorsFormatError,
        "overlaps the previous",
    ),
    "wrong byte count": (
        write_weights_bytes(raw_safetensors(SHORT_DATA, bytes(8))),
        E.SafetensorsFormatError,
        "8 bytes of data for shape",
    ),
    "no tensors": (write_weights_bytes(raw_safetensors({}, b"")), E.TensorNameError, "contains no tensors"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_adapter_is_rejected(store: AdapterStore, make_adapter: AdapterFactory, case: str) -> None:
    corrupt, error_type, message = MALFORMED[case]
    directory = make_adapter()
    corrupt(directory)
    with pytest.raises(error_type) as raised:
        store.push(directory, "team-a/bad")
    assert message in str(raised.value)
    assert raised.value.exit_code == errors.EXIT_REJECTED
    assert_empty(store)
    assert store.events() == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_weights_just_below_the_magnitude_bound_are_accepted(
    store: AdapterStore, make_adapter: AdapterFactory, dtype: torch.dtype
) -> None:
    bound = torch.tensor(LORA_MAGNITUDE_BOUND, dtype=dtype)
    largest = torch.nextafter(bound, torch.zeros((), dtype=dtype)).item()
    directory = make_adapter()
    edit_tensors(set_element(A_KEY, -largest, dtype))(directory)
    assert store.push(directory, "team-a/loud").version == 1


def test_magnitude_check_shared_with_the_engine() -> None:
    for fine in (0.0, 0.5, 1023.99):
        check_lora_magnitude("layers.0.q_proj.lora_A", fine)
    for bad, shown in ((1024.0, "1024"), (1e30, "1e+30"), (float("inf"), "inf"), (float("nan"), "nan")):
        with pytest.raises(errors.WeightMagnitudeError) as raised:
            check_lora_magnitude("layers.0.q_proj.lora_A", bad)
        assert str(raised.value) == (
            f"tensor 'layers.0.q_proj.lora_A' has max |value| {shown}, at or above 1024, the bound for a trained "
            "LoRA weight; check how these weights were exported or scaled"
        )
        assert raised.value.exit_code == errors.EXIT_REJECTED


def test_cli_rejects_scaled_weights(registry_url: str, make_adapter: AdapterFactory) -> None:
    directory = make_adapter()
    edit_tensors(lambda tensors: tensors.update({k: t.float() * 1e30 for k, t in tensors.items()}))(directory)
    result = run_cli("push", str(directory), "--name", "team-a/loud", registry=registry_url)
    assert_one_line_error(result, errors.EXIT_REJECTED, "at or above 1024, the bound for a trained LoRA weight")
    assert run_cli("list", registry=registry_url).stdout.strip() == "no adapters"


def test_size_limits(registry_url: str, make_adapter: AdapterFactory) -> None:
    with open_store(registry_url, token="", limits=Limits(max_weights_bytes=1000)) as store:
        with pytest.raises(
            errors.FileTooLargeError, match=r"adapter_model.safetensors: \d+ bytes exceeds the limit of 1000"
        ):
            store.push(make_adapter(), "team-a/big")
        assert_empty(store)


def test_configurable_max_rank(registry_url: str, make_adapter: AdapterFactory) -> None:
    with (
        open_store(registry_url, token="", limits=Limits(max_rank=2)) as store,
        pytest.raises(errors.RankError, match="r=4 exceeds the registry's maximum rank 2"),
    ):
        store.push(make_adapter(rank=4), "team-a/wide")


@pytest.mark.parametrize(("flag", "suffix"), [("use_dora", "lora_magnitude_vector"), ("lora_bias", "lora_B.bias")])
def test_module_vectors_are_checked_against_lora_b(
    store: AdapterStore, make_adapter: AdapterFactory, flag: str, suffix: str
) -> None:
    """DoRA's magnitudes and lora_bias's biases: one [out_features] vector per LoRA module, out_features of lora_B."""

    def add_vectors(length: int) -> Callable[[dict[str, torch.Tensor]], None]:
        def change(tensors: dict[str, torch.Tensor]) -> None:
            for key in [key for key in tensors if key.endswith("lora_B.weight")]:
                tensors[key.replace("lora_B.weight", suffix)] = torch.ones(length, dtype=HALF)

        return change

    directory = make_adapter(config={flag: True})
    edit_tensors(add_vectors(4))(directory)
    with pytest.raises(errors.TensorShapeError, match=rf"has shape \[4\]; {re.escape(suffix)} is \[16\]"):
        store.push(directory, "team-a/vectors")
    edit_tensors(add_vectors(16))(directory)
    assert store.push(directory, "team-a/vectors").version == 1


def test_peft_extras_that_are_off_are_accepted(store: AdapterStore, make_adapter: AdapterFactory) -> None:
    directory = make_adapter(
        config={"use_rslora": True, "layers_to_transform": [0, 1], "lora_dropout": 0.1, "future_flag": None}
    )
    record = store.push(directory, "team-a/ok")
    assert record.use_rslora and record.scaling == pytest.approx(8 / 2)


def test_rank_and_alpha_patterns_are_read_as_peft_reads_them(store: AdapterStore, make_adapter: AdapterFactory) -> None:
    """PEFT's get_pattern_key: the first key (in the file's order) matching the end of the module path wins."""
    from adapters_registry.peft_config import check_config

    # Tensors of rank 4 everywhere; r says 8, the patterns bring every module back to 4.
    pattern = {r"layers\.0\.self_attn\.q_proj": 4, "q_proj": 2, "v_proj": 4, "layers.1.self_attn.q_proj": 6}
    with pytest.raises(errors.RankError, match=r"r=2 for model\.layers\.1\.self_attn\.q_proj"):
        store.push(make_adapter(config={"r": 8, "rank_pattern": pattern}), "team-a/patterns")
    fitting = {r"layers\.0\.self_attn\.q_proj": 4, "v_proj": 4, "layers.1.self_attn.q_proj": 4}
    assert store.push(make_adapter(config={"r": 8, "rank_pattern": fitting}), "team-a/patterns").version == 1
    settings = check_config({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                             "rank_pattern": pattern, "alpha_pattern": {"q_proj": 1}}, max_rank=64)  # fmt: skip
    assert settings.rank_of("model.layers.0.self_attn.q_proj") == 4  # the first matching key, not the most specific
    assert settings.rank_of("model.layers.1.self_attn.q_proj") == 2
    assert settings.rank_of("model.layers.1.self_attn.k_proj") == 8  # no key matches: r
    assert settings.rank_of("model.layers.1.self_attn.xq_proj") == 8  # keys match whole dotted components only
    assert settings.scaling_of("model.layers.1.self_attn.q_proj") == 1 / 2
    assert settings.scaling_of("model.layers.1.self_attn.v_proj") == 16 / 4
    assert settings.max_rank == 8


BASE_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 64,
    "hidden_size": 16,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "num_hidden_layers": 2,
    "intermediate_size": 32,
}


def manifest_for(config: dict) -> dict:
    """What `kvrun model-manifest` writes for a model with this config.json."""
    from kvrun.runtime.models.manifest import manifest
    from kvrun.runtime.models.registry import read_model_config

    return manifest(read_model_config(config, "tiny"))


def test_shapes_checked_against_registered_base_model(store: AdapterStore, make_adapter: AdapterFactory) -> None:
    store.set_base_config("tiny/base", manifest_for(BASE_CONFIG))
    assert store.list_base_models() == ["tiny/base"]
    # q_proj fits (16 -> 2 heads x 8), v_proj does not (16 -> 1 KV head x 8 = 8, the adapter says 16).
    with pytest.raises(errors.BaseModelMismatchError, match=r"v_proj.*expected lora_A \[r, 16\], lora_B \[8, r\]"):
        store.push(make_adapter(), "team-a/misfit")
    with pytest.raises(errors.BaseModelMismatchError, match="layer 2 does not exist"):
        store.push(make_adapter(layers=3, modules=("q_proj",)), "team-a/deep")
    assert_empty(store)
    assert store.push(make_adapter(modules=("q_proj", "o_proj")), "team-a/fits").version == 1
    # An explicit manifest wins over the registered one.
    with pytest.raises(errors.BaseModelMismatchError):
        store.push(make_adapter(), "team-a/misfit", base_config=manifest_for({**BASE_CONFIG, "num_key_value_heads": 1}))
    wide = manifest_for({**BASE_CONFIG, "num_key_value_heads": 2})
    assert store.push(make_adapter(), "team-a/fits", base_config=wide).version == 2


def test_a_model_config_is_not_a_manifest(store: AdapterStore) -> None:
    with pytest.raises(errors.UsageError, match=r"looks like a model's config.json.*kvrun model-manifest"):
        store.set_base_config("tiny/base", BASE_CONFIG)


def test_modules_the_architecture_lacks_are_refused(store: AdapterStore, make_adapter: AdapterFactory) -> None:
    phi3 = {**BASE_CONFIG, "architectures": ["Phi3ForCausalLM"], "num_key_value_heads": 2}
    store.set_base_config("tiny/phi3", manifest_for(phi3))
    # Phi-3 fuses q/k/v into one qkv_proj module: an adapter on q_proj cannot belong to it.
    with pytest.raises(errors.BaseModelMismatchError, match=r"not a LoRA-targetable module.*qkv_proj"):
        store.push(make_adapter(modules=("q_proj",)), "team-a/llama-shaped", base_model="tiny/phi3")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations raised inside PEFT
def test_real_peft_output_is_accepted_and_fits_its_base(store: AdapterStore, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=64,
    )  # fmt: skip
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=modules, init_lora_weights=False)
    get_peft_model(LlamaForCausalLM(base), lora).save_pretrained(tmp_path / "peft")
    store.set_base_config("tiny/llama", manifest_for(base.to_dict()))
    record = store.push(tmp_path / "peft", "team-a/real", base_model="tiny/llama")
    assert (record.rank, record.alpha, record.dtype, record.target_modules) == (4, 8.0, "F32", sorted(modules))
    store.set_base_config("tiny/llama", manifest_for({**base.to_dict(), "intermediate_size": 48}))
    with pytest.raises(errors.BaseModelMismatchError, match=r"mlp\.(down|gate|up)_proj"):
        store.push(tmp_path / "peft", "team-a/real", base_model="tiny/llama")
