"""IncrementalDetokenizer against the algorithm it replaced (two `tokenizer.decode` calls a step): the same text,
step by step, for the bundled SmolLM2, a byte-level BPE and a byte-fallback (Llama-2 style) tokenizer, over random
ids and real texts (multi-byte UTF-8 split across byte tokens, special and added tokens, leading spaces)."""

from __future__ import annotations

import json
import random

import pytest

from kvrun.engine.detokenizer import IncrementalDetokenizer, text_decoder

TEXTS = (
    "Hello, world! It's a test.",
    "  two leading spaces, then   three inside",
    " one leading space",
    "héllo wörld — ça va? naïve café",
    "数字 世界 こんにちは 안녕하세요",
    "emoji 🦙🦙 and 👩‍👩‍👧 a family, 🇫🇷 a flag",
    "mixed: aé数🦙b\n\ttabs and\nnew lines\n",
    "😀",
    " 世",
)


def reference_steps(tokenizer, token_ids: list[int], chunks: list[int], skip_special_tokens: bool) -> list[str]:
    """The algorithm with transformers' decode throughout: the settled prefix and the whole window decoded each step;
    the next window starts up to 4 tokens back, at the first start whose text does not begin with U+FFFD."""
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    prefix_offset = read_offset = 0
    ids: list[int] = []
    pieces = []
    for size in chunks:
        ids += token_ids[len(ids) : len(ids) + size]
        settled, full = decode(ids[prefix_offset:read_offset]), decode(ids[prefix_offset:])
        if len(full) <= len(settled) or full.endswith("\ufffd"):
            pieces.append("")
            continue
        read_offset = len(ids)
        starts = range(max(0, read_offset - 4), read_offset)
        prefix_offset = next((start for start in starts if not decode(ids[start:read_offset]).startswith("\ufffd")),
                             read_offset - 1)  # fmt: skip
        pieces.append(full[len(settled) :])
    return pieces


def new_steps(tokenizer, token_ids: list[int], chunks: list[int], skip_special_tokens: bool) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    ids: list[int] = []
    pieces = []
    for size in chunks:
        ids += token_ids[len(ids) : len(ids) + size]
        pieces.append(detokenizer.step(ids))
    return pieces


def assert_same_steps(tokenizer, token_ids: list[int], rng: random.Random) -> None:
    one_by_one = [1] * len(token_ids)
    several = []
    while sum(several) < len(token_ids):
        several.append(rng.randint(1, 3))
    for chunks in (one_by_one, several):
        for skip in (True, False):
            expected = reference_steps(tokenizer, token_ids, chunks, skip)
            assert new_steps(tokenizer, token_ids, chunks, skip) == expected, (token_ids, chunks, skip)


def random_ids(tokenizer, rng: random.Random, length: int) -> list[int]:
    """Ids from the whole vocabulary, the special and added tokens, and the short tokens that carry single bytes
    (so multi-byte characters are often split, completed or left broken)."""
    vocab = tokenizer.get_vocab()
    special = sorted(tokenizer.added_tokens_decoder)
    short = sorted(index for token, index in vocab.items() if len(token) == 1 or token.startswith("<0x"))
    pools = (range(len(tokenizer)), special, short, short)
    return [rng.choice(rng.choice(pools)) for _ in range(length)]


def text_ids(tokenizer, rng: random.Random) -> list[list[int]]:
    """Real texts, alone, joined with special and added tokens between and around them."""
    special = [token for token in tokenizer.all_special_tokens]
    added = [token for token in tokenizer.get_added_vocab() if token not in special]
    sequences = [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
    for _ in range(20):
        parts = rng.sample(TEXTS, 3) + rng.sample(special + added, min(3, len(special + added)))
        rng.shuffle(parts)
        sequences.append(tokenizer.encode("".join(parts), add_special_tokens=False))
    return sequences


@pytest.fixture(scope="module")
def smollm2():
    from kvrun.engine.tokenizer import load_tokenizer
    from kvrun.runtime.loader import resolve_model

    return load_tokenizer(resolve_model(None))


CORPUS = [f'{{"name": "item {i}", "ok": {str(i % 2 == 0).lower()}, "count": {i}}} red green blue 555-{i:04d} café'
          for i in range(500)]  # fmt: skip


@pytest.fixture(scope="module")
def byte_level_bpe():
    """A small byte-level BPE (GPT-2 style), as the structured-output GPU test builds, plus added tokens."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(CORPUS, vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=trainer._tokenizer, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tokenizer.add_tokens(["<plain>", " spaced"])  # added, not special: never skipped
    return tokenizer


@pytest.fixture(scope="module")
def byte_fallback():
    """A Llama-2 style tokenizer: "▁" for spaces, a prepended "▁" stripped again when decoding, and <0xNN> byte
    tokens for every character the vocabulary lacks, which decode to U+FFFD until their character is complete."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")  # fmt: skip
    tokenizer.add_tokens(["<plain>"])
    return tokenizer


TOKENIZERS = ("smollm2", "byte_level_bpe", "byte_fallback")


@pytest.mark.parametrize("name", TOKENIZERS)
def test_fast_tokenizers_decode_in_rust(request, name):
    tokenizer = request.getfixturevalue(name)
    assert not tokenizer.clean_up_tokenization_spaces
    assert text_decoder(tokenizer) == tokenizer._tokenizer.decode  # else the comparisons below test nothing new


@pytest.mark.parametrize("name", TOKENIZERS)
def test_random_ids_give_the_text_transformers_decode_gave(request, name):
    tokenizer = request.getfixturevalue(name)
    rng = random.Random(name)
    for _ in range(300):
        assert_same_steps(tokenizer, random_ids(tokenizer, rng, rng.randint(1, 24)), rng)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_real_texts_give_the_text_transformers_decode_gave(request, name):
    tokenizer = request.getfixturevalue(name)
    rng = random.Random(name)
    for token_ids in text_ids(tokenizer, rng):
        assert_same_steps(tokenizer, token_ids, rng)
        if name != "byte_fallback":  # see the known failure below
            for skip in (True, False):  # and the pieces add up to the whole text
                text = "".join(new_steps(tokenizer, token_ids, [1] * len(token_ids), skip))
                assert text == tokenizer.decode(token_ids, skip_special_tokens=skip).removesuffix("\ufffd")


def test_byte_fallback_runs_of_multibyte_characters_add_up_to_the_text(byte_fallback):
    """A window that started inside a byte-fallback character turned the whole run of byte tokens after it into
    U+FFFD, so the rest of a CJK run never came out ("こんに" of "こんにちは")."""
    token_ids = byte_fallback.encode("こんにちは", add_special_tokens=False)
    assert "".join(new_steps(byte_fallback, token_ids, [1] * len(token_ids), True)) == "こんにちは"


def test_broken_characters_are_held_back_until_complete(byte_fallback):
    token_ids = byte_fallback.encode("a🦙", add_special_tokens=False)
    assert len(token_ids) >= 5 and all(byte_fallback.convert_ids_to_tokens(i).startswith("<0x") for i in token_ids[-4:])
    detokenizer = IncrementalDetokenizer(byte_fallback)
    pieces = [detokenizer.step(token_ids[:end]) for end in range(1, len(token_ids) + 1)]
    assert pieces[-4:] == ["", "", "", "🦙"] and "".join(pieces) == "a🦙"


def test_cleanup_and_overridden_decodes_keep_the_tokenizers_decode(byte_level_bpe):
    from transformers import PreTrainedTokenizerFast

    class Cleaning(PreTrainedTokenizerFast):
        pass

    cleaning = Cleaning(tokenizer_object=byte_level_bpe.backend_tokenizer, clean_up_tokenization_spaces=True,
                        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True)  # fmt: skip
    assert text_decoder(cleaning) == cleaning.decode
    token_ids = cleaning.encode("red , green . it 's", add_special_tokens=False)
    assert_same_steps(cleaning, token_ids, random.Random(0))

    class Shouting(PreTrainedTokenizerFast):
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs).upper()

    shouting = Shouting(tokenizer_object=byte_level_bpe.backend_tokenizer)
    assert text_decoder(shouting) == shouting.decode
    assert "".join(new_steps(shouting, token_ids, [1] * len(token_ids), True)) == "RED , GREEN . IT 'S"


def test_a_tokenizer_that_is_not_from_transformers_is_called_as_it_is():
    class Letters:
        def decode(self, token_ids, skip_special_tokens=True):
            return "".join(chr(ord("a") + i) for i in token_ids if not (skip_special_tokens and i == 0))

    detokenizer = IncrementalDetokenizer(Letters())
    assert [detokenizer.step([0, 1, 2][:end]) for end in (1, 2, 3)] == ["", "b", "c"]
