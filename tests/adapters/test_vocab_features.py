"""PEFT's trainable tokens (trainable_token_indices) and whole layer copies (modules_to_save) of the token embedding
and output layer, made by PEFT on tiny random models (fp32) and served in one mixed batch with a plain LoRA adapter
and base rows: each row's greedy tokens equal HF + PEFT run with that row's adapter alone, logprobs within 1e-4."""

from __future__ import annotations

import pytest
import torch

from kvrun import LLM
from kvrun.adapters import AdapterError
from tests.adapters.test_peft_features import FeatureModel
from tests.models.families import PeftSpec, SoloReferences
from tests.models.test_families import rows_for

# Every sixth token id: most prompts of rows_for hold some, and some are among the top logits of most steps.
TOKENS = list(range(3, 250, 6))


def assert_changes_output(model: FeatureModel, name: str) -> None:
    """The adapter's PEFT reference differs from the base model's on its rows: the test exercises the feature."""
    reference = SoloReferences(model.base, {name: model.adapters[name]})
    prompts = [prompt for prompt, adapter in rows_for([name]) if adapter == name]
    assert any(not torch.allclose(torch.stack(reference.greedy(prompt, name, 4)[1]),
                                  torch.stack(reference.greedy(prompt, None, 4)[1])) for prompt in prompts)  # fmt: skip


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> FeatureModel:
    return FeatureModel("llama", tmp_path_factory.mktemp("tied"), tie_word_embeddings=True)


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> FeatureModel:
    return FeatureModel("llama", tmp_path_factory.mktemp("untied"))


# -- trainable tokens --------------------------------------------------------------------------------------------------
def test_trainable_tokens_of_the_embedding_match_peft(untied, tmp_path):
    """The list form: the token embedding's rows of the listed ids are replaced (the output layer is another matrix)."""
    name = untied.add(PeftSpec("tokens", 4, ["q_proj"], extra={"trainable_token_indices": TOKENS}))
    assert_changes_output(untied, name)
    untied.check_mixed_batch(name)
    untied.push(name, tmp_path / "registry")


def test_trainable_tokens_of_a_tied_embedding_change_the_output_layer_too(tied, tmp_path):
    """With tied embeddings PEFT applies the embedding's new rows to the output layer as well; a second adapter names
    both layers with different ids (PEFT then keeps them apart and saves both), a third the output layer alone."""
    both = tied.add(PeftSpec("tied-tokens", 4, ["q_proj"], extra={"trainable_token_indices": TOKENS}))
    apart = tied.add(PeftSpec("apart", 4, ["v_proj"], extra={
        "trainable_token_indices": {"embed_tokens": TOKENS[:20], "lm_head": TOKENS[20:]}}))  # fmt: skip
    head = tied.add(PeftSpec("head-tokens", 2, ["k_proj"], extra={"trainable_token_indices": {"lm_head": TOKENS}}))
    for name in (both, apart, head):
        assert_changes_output(tied, name)
    tied.check_mixed_batch(both, apart, head)
    tied.push(apart, tmp_path / "registry")


def test_trainable_tokens_on_another_family_match_peft(tmp_path):
    model = FeatureModel("qwen2", tmp_path)
    name = model.add(PeftSpec("tokens", 4, ["q_proj"],
                              extra={"trainable_token_indices": {"embed_tokens": TOKENS, "lm_head": TOKENS[::2]}}))
    model.check_mixed_batch(name)


def test_trainable_tokens_beyond_the_engine_limit_are_refused(untied):
    name = untied.add(PeftSpec("many-tokens", 4, ["q_proj"], extra={"trainable_token_indices": TOKENS}))
    llm = LLM(str(untied.base), max_loras=1, max_lora_rank=8, num_blocks=16, max_trainable_tokens=8)
    with pytest.raises(AdapterError, match=rf"lists {len(TOKENS)} tokens for model.embed_tokens; this engine serves "
                                           r"up to 8 per layer \(--max-trainable-tokens"):  # fmt: skip
        llm.load_adapter(name, untied.adapters[name])


def test_trainable_tokens_with_lora_on_the_same_tied_matrix_are_refused(tied):
    name = tied.add(PeftSpec("tokens-and-head", 4, ["q_proj", "lm_head"], extra={"trainable_token_indices": TOKENS}))
    llm = LLM(str(tied.base), max_loras=1, max_lora_rank=8, num_blocks=16)
    with pytest.raises(AdapterError, match=r"trainable tokens and LoRA on lm_head .* are not served"):
        llm.load_adapter(name, tied.adapters[name])


# -- modules_to_save ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [["lm_head"], ["embed_tokens"], ["embed_tokens", "lm_head"]])
def test_whole_layer_copies_match_peft(untied, layers, tmp_path):
    # (PEFT matches modules_to_save as name suffixes, so no adapter name may end in a layer's name)
    name = untied.add(PeftSpec(f"copies-{len(layers)}{layers[0][0]}", 4, ["q_proj"], extra={"modules_to_save": layers}))
    assert_changes_output(untied, name)
    untied.check_mixed_batch(name, max_full_module_slots=1)
    untied.push(name, tmp_path / "registry")


def test_copies_of_a_tied_matrix_take_one_role_each(tied):
    """modules_to_save=["lm_head"] on tied embeddings: PEFT copies the output layer alone, the embedding stays the
    base model's (and the other way round)."""
    head = tied.add(PeftSpec("head-copy", 4, ["q_proj"], extra={"modules_to_save": ["lm_head"]}))
    embedding = tied.add(PeftSpec("embedding-copy", 4, ["v_proj"], extra={"modules_to_save": ["embed_tokens"]}))
    tied.check_mixed_batch(head, embedding, max_full_module_slots=2)


def test_adapters_share_one_full_module_slot_in_turn(untied):
    """Two adapters with copies and one full-module slot: their requests take turns, the copy is reloaded, and
    every row still matches PEFT (an output layer with a bias: Phi's)."""
    model = FeatureModel("phi", untied.root / "phi")
    first = model.add(PeftSpec("copy-a", 4, ["q_proj"], extra={"modules_to_save": ["lm_head"]}))
    second = model.add(PeftSpec("copy-b", 4, ["k_proj"], extra={"modules_to_save": ["lm_head", "embed_tokens"]}))
    model.check_mixed_batch(first, second, max_full_module_slots=1)


def test_copies_without_full_module_slots_are_refused_with_the_option_to_set(untied):
    name = untied.add(PeftSpec("copy-refused", 4, ["q_proj"], extra={"modules_to_save": ["lm_head"]}))
    llm = LLM(str(untied.base), max_loras=1, max_lora_rank=8, num_blocks=16)
    refusal = r"modules_to_save \(lm_head\) needs a whole copy .* --max-full-module-slots"
    with pytest.raises(AdapterError, match=refusal):
        llm.load_adapter(name, untied.adapters[name])
