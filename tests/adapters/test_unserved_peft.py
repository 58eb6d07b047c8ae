"""What PEFT can save that kvrun does not serve is refused by name, with the same words at push (the registry, no
torch) and at load (the engine): every adapter here is made by PEFT itself on a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters_registry import errors, open_store
from adapters_registry.peft_config import UNSERVED_BIAS, UNSERVED_PEFT_TYPES
from kvrun import LLM
from kvrun.adapters import AdapterError
from tests.models.families import FAMILIES, tiny_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _lora(targets=("q_proj", "v_proj"), **options):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False, **options)


def _method(name: str, **options):
    import peft

    return getattr(peft, name)(target_modules=["q_proj", "v_proj"], **options)


# case → (the PEFT config, words the refusal must contain)
CASES = {
    "loha": (lambda: _method("LoHaConfig", r=4, alpha=8), f"peft_type is 'LOHA' ({UNSERVED_PEFT_TYPES['LOHA']})"),
    "lokr": (lambda: _method("LoKrConfig", r=4, alpha=8), f"peft_type is 'LOKR' ({UNSERVED_PEFT_TYPES['LOKR']})"),
    "ia3": (lambda: _method("IA3Config", feedforward_modules=[]), f"peft_type is 'IA3' ({UNSERVED_PEFT_TYPES['IA3']})"),
    "oft": (lambda: _method("OFTConfig", r=4, oft_block_size=0), f"peft_type is 'OFT' ({UNSERVED_PEFT_TYPES['OFT']})"),
    "bias all": (lambda: _lora(bias="all"), UNSERVED_BIAS["all"]),
    "bias lora_only": (lambda: _lora(bias="lora_only"), UNSERVED_BIAS["lora_only"]),
    "modules_to_save of a norm": (
        lambda: _lora(modules_to_save=["post_attention_layernorm"]),
        "kvrun serves whole per-adapter copies of the token embedding and the output layer only",
    ),
    "trainable tokens of an activated LoRA": (
        lambda: _lora(alora_invocation_tokens=[5], trainable_token_indices=[3, 4]),
        "alora_invocation_tokens with trainable_token_indices or modules_to_save is not served",
    ),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_checkpoint(FAMILIES["llama"], tmp_path_factory.mktemp("unserved") / "base", seed=3)


@pytest.fixture(scope="module")
def llm(base) -> LLM:
    return LLM(str(base), max_loras=1, max_lora_rank=8, num_blocks=16, block_size=4)


def _save(base: Path, config, directory: Path) -> Path:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.mark.parametrize("case", list(CASES))
def test_unserved_peft_feature_is_refused_by_name_at_push_and_at_load(case, base, llm, tmp_path):
    make_config, words = CASES[case]
    directory = _save(base, make_config(), tmp_path / "adapter")
    with open_store(f"file://{tmp_path / 'registry'}", token="") as store:
        with pytest.raises(errors.UnsupportedConfigError) as pushed:
            store.push(directory, "team/unserved")
        assert store.list_adapters() == []
    with pytest.raises(AdapterError) as loaded:
        llm.load_adapter("unserved", directory)
    assert words in str(pushed.value)
    assert str(loaded.value) == f"adapter 'unserved': {pushed.value}"
    assert "unserved" not in llm.engine.adapters.names()


def test_a_peft_type_kvrun_does_not_know_is_refused_with_its_value():
    from adapters_registry.peft_config import check_config

    with pytest.raises(errors.UnsupportedConfigError, match=r"peft_type is 'NEWFT'; kvrun serves LoRA adapters"):
        check_config({"peft_type": "NEWFT", "r": 4, "target_modules": ["q_proj"]}, max_rank=8)
