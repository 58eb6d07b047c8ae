"""The engine core's start-up message: the EngineInfo a server runs on arrives as MessagePack and compares equal to
what the core built, torch dtypes and every family's ModelConfig (rope parameters included) alike."""

from __future__ import annotations

from dataclasses import replace

import msgspec
import pytest
import torch

from kvrun import LLM
from kvrun.engine.core import EngineInfo
from kvrun.engine.core_process import FrameBuffer, FromCore, Ready, encode
from kvrun.runtime.models.registry import read_model_config
from tests.models.families import FAMILIES, TINY
from tests.models.test_configs import ROPE_STYLES


def _received(info: EngineInfo) -> EngineInfo:
    """info as the server gets it: framed, encoded, decoded against the core's message types."""
    (message,) = FrameBuffer(FromCore).feed(encode(Ready(info, ["a", "b"])))
    assert isinstance(message, Ready) and message.adapter_names == ["a", "b"]
    return message.info


@pytest.fixture(scope="module")
def info(tiny_gqa) -> EngineInfo:
    base, _ = tiny_gqa
    llm = LLM(str(base), dtype="bfloat16", max_loras=2, max_lora_rank=16, num_blocks=32, block_size=4)
    try:
        return EngineInfo.of(llm.engine)
    finally:
        llm.engine.shutdown()


def test_a_loaded_engines_info_arrives_equal(info):
    assert (info.weight_dtype, info.adapter_dtype) == (torch.bfloat16, torch.bfloat16)
    received = _received(info)
    assert received == info
    assert received.weight_dtype is torch.bfloat16 and received.adapter_dtype is torch.bfloat16
    assert received.kv_capacity == 32 * 4


@pytest.mark.parametrize("dtypes", [(torch.float32, None), (torch.float16, torch.float32)])
def test_every_dtype_pair_arrives_as_itself(info, dtypes):
    sent = replace(info, weight_dtype=dtypes[0], adapter_dtype=dtypes[1])
    received = _received(sent)
    assert (received.weight_dtype, received.adapter_dtype) == dtypes and received == sent


def _model_config(family: str, **overrides):
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = getattr(transformers, FAMILIES[family].config_class)(**{**TINY, **FAMILIES[family].overrides,
                                                                       **overrides})  # fmt: skip
    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]
    return read_model_config({**config.to_dict(), "architectures": [architecture]}, family)


MODEL_CONFIGS = {
    **{family: (family, {}) for family in FAMILIES},
    **{f"llama {kind} rope": ("llama", {"rope_parameters": {**rope, "rope_theta": 10000.0}})
       for kind, rope in ROPE_STYLES.items()},
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MODEL_CONFIGS))
def test_every_family_model_config_arrives_equal(info, case):
    """Tuples stay tuples (rope parameter pairs, Phi-3's longrope factor lists), so the decoded specs compare and
    hash as the core's do."""
    family, overrides = MODEL_CONFIGS[case]
    sent = replace(info, model_config=_model_config(family, **overrides))
    received = _received(sent)
    assert received == sent
    assert hash(received.model_config) == hash(sent.model_config)


def test_a_dtype_name_torch_lacks_is_refused(info):
    frames = FrameBuffer(FromCore)
    with pytest.raises(msgspec.ValidationError, match="'bf16' is not a torch dtype"):
        frames.feed(encode(Ready(replace(info, weight_dtype="bf16"), [])))
