import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from kernel.config import CHOICES, ConfigError
from kernel.env import KernelError
from kernel.sources import Source
from kernel.data import prepare_data, training_text_sample
from kernel.tokenization import (END_OF_DOCUMENT, TOKENIZERS, BPETokenizer, CharTokenizer, HFTokenizer,
                                 load_tokenizer, tokenizer_from_dict)

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog.\n",
    "french": "Où est la bibliothèque ? Ça coûte très cher, déjà.\n",
    "chinese": "我们在卡格尔上从零开始训练一个语言模型。\n",
    "emoji": "rocket 🚀, family 👨‍👩‍👧, flag 🇫🇷\n",
}
MIXED = "".join(TEXTS.values())
CORPUS = (MIXED + "Il était une fois un modèle de langue. 从前有一个语言模型。 Once upon a time.\n") * 40


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([CORPUS], vocab_size=400)


@pytest.mark.parametrize("name", TEXTS)
def test_char_round_trip(name):
    tokenizer = CharTokenizer.train(MIXED)
    ids = tokenizer.encode(TEXTS[name])
    assert len(ids) == len(TEXTS[name]) and 0 not in ids
    assert tokenizer.decode(ids) == TEXTS[name]


@pytest.mark.parametrize("name", TEXTS)
def test_bpe_round_trip_in_any_language(bpe, name):
    ids = bpe.encode(TEXTS[name])
    assert bpe.decode(ids) == TEXTS[name]
    assert len(ids) < len(TEXTS[name].encode("utf-8"))  # merges happened: fewer tokens than bytes


def test_char_vocabulary_is_sorted_and_independent_of_text_order():
    a, b = CharTokenizer.train("banana split"), CharTokenizer.train("split banana")
    assert a.chars == b.chars == ["\ufffd", " ", "a", "b", "i", "l", "n", "p", "s", "t"]
    assert a.vocab_size == 11 and a.eos_id == 10 and a.decode([10]) == END_OF_DOCUMENT  # end-of-text comes last


def test_char_unseen_characters_become_the_unknown_token():
    tokenizer = CharTokenizer.train("abc")
    assert tokenizer.encode("abzc") == [1, 2, 0, 3]
    assert tokenizer.decode(tokenizer.encode("abzc")) == "ab\ufffdc"
    assert tokenizer.decode([999]) == "\ufffd"  # out-of-range ids never crash either


def test_bpe_is_deterministic_and_has_an_end_of_document_token(bpe):
    again = BPETokenizer.train([CORPUS], vocab_size=400)
    assert again.backend.to_str() == bpe.backend.to_str()
    assert bpe.vocab_size == 400 and bpe.decode([bpe.eos_id]) == END_OF_DOCUMENT
    assert bpe.encode(f"a{END_OF_DOCUMENT}b") == bpe.encode("a") + [bpe.eos_id] + bpe.encode("b")


def test_bpe_vocabulary_larger_than_the_corpus_supports_is_an_error():
    with pytest.raises(KernelError, match="tokenizer.vocab_size=5000 is more than this corpus supports"):
        BPETokenizer.train(["tiny text, tiny text"], vocab_size=5000)


def test_bpe_trains_on_a_bounded_evenly_spread_sample_of_the_training_split():
    text = "".join(f"{i:06d}" for i in range(200_000))  # 1.2M chars
    sources = [Source("a", text=text[:500_000]), Source("b", text=text[500_000:])]
    chunks = list(training_text_sample(sources, split_at=1_080_000, max_chars=2**18, chunk_chars=2**16))
    assert len(chunks) == 4 and sum(map(len, chunks)) == 2**18
    assert chunks[0].startswith("000000") and len(set(chunks)) == 4
    assert all(text.index(chunk) + len(chunk) <= 1_080_000 for chunk in chunks)  # never from the validation tail
    assert "".join(training_text_sample([Source("s", text="short text")], 5, 100)) == "short"


@pytest.mark.parametrize("mode", ["char", "bpe_simple"])
def test_saved_tokenizer_loads_offline_with_autotokenizer_and_gives_identical_ids(tmp_path, mode, bpe):
    tokenizer = CharTokenizer.train(CORPUS) if mode == "char" else bpe
    tokenizer.save(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    for text in list(TEXTS.values()) + ["unseen: Ωmega ✓"]:
        assert hf.encode(text, add_special_tokens=False) == tokenizer.encode(text)
        assert hf.decode(tokenizer.encode(text)) == tokenizer.decode(tokenizer.encode(text))
    reloaded = load_tokenizer(tmp_path / "tok")
    assert reloaded.mode == mode and reloaded.encode(MIXED) == tokenizer.encode(MIXED)
    assert tokenizer_from_dict(tokenizer.to_dict()).encode(MIXED) == tokenizer.encode(MIXED)


def test_hf_mode_with_a_local_folder(tmp_path, bpe):
    bpe.save(tmp_path / "local")
    tokenizer = HFTokenizer.load(str(tmp_path / "local"))
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.eos_id == bpe.eos_id
    assert tokenizer.encode(MIXED) == bpe.encode(MIXED)
    assert tokenizer.encode_batch(list(TEXTS.values())) == [bpe.encode(t) for t in TEXTS.values()]
    tokenizer.save(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").encode(MIXED) == bpe.encode(MIXED)


@pytest.mark.slow
def test_hf_mode_offline_with_an_unknown_name_explains_what_to_do():
    code = ("from kernel.tokenization import HFTokenizer\n"
            "from kernel.env import KernelError\n"
            "try:\n    HFTokenizer.load('no-such-user/no-such-tokenizer')\n"
            "except KernelError as err:\n    print(err)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent-hf-home"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "'no-such-user/no-such-tokenizer' could not be loaded" in done.stdout
    assert "attach a dataset" in done.stdout and "tokenizer.mode=bpe_simple" in done.stdout


@pytest.mark.slow
def test_a_hub_name_without_network_is_one_error_without_retries():
    code = ("from kernel.tokenization import HFTokenizer\n"
            "from kernel.env import KernelError\n"
            "try:\n    HFTokenizer.load('gpt2')\n"
            "except KernelError as err:\n    print(err)\n")
    env = {**os.environ, "HF_ENDPOINT": "https://127.0.0.1:9", "HF_HOME": "/nonexistent-hf-home"}  # nothing listens
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "'gpt2' could not be loaded" in done.stdout and "127.0.0.1 cannot be reached" in done.stdout
    assert "Retrying" not in done.stderr + done.stdout and "attach a dataset" in done.stdout


def test_empty_training_text_and_missing_folders_are_errors(tmp_path):
    with pytest.raises(KernelError, match="empty"):
        CharTokenizer.train("")
    with pytest.raises(KernelError, match="no saved tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(KernelError, match="could not be loaded from the folder"):
        HFTokenizer.load(str(tmp_path))


def test_bpe_fast_path_gives_the_ids_of_the_rust_tokenizer(bpe):
    import random
    rng = random.Random(0)
    alphabet = list("ab ,.'\n\t\r\x0b") + ["  ", "   ", "\u00a0", "\u3000", "\u2003", "\u2028", "\x1c", "\x85", "é",
                                         "我", "🚀", "'s", "1", "\n  ", " \n"]
    texts = list(TEXTS.values()) + [CORPUS[:5000]]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    for text in texts:
        assert bpe.encode_array(text).tolist() == bpe.encode(text), repr(text)


def test_bpe_fast_path_on_long_text_with_blocks_and_both_segmenters(bpe, monkeypatch):
    monkeypatch.setattr(BPETokenizer, "BLOCK_CHARS", 30)
    prose = (TEXTS["english"] + TEXTS["french"]).replace("\n", " ") * 20  # every space a cut: str.split path
    ragged = prose[:400] + "  indented\n    code  here\n" + prose[400:]   # double spaces: regex path blocks
    for text in (prose, ragged, " leading", "trailing ", ragged[::-1]):
        assert bpe.encode_array(text).tolist() == bpe.encode(text), repr(text[:40])


def test_bpe_line_breaks_are_cut_exactly(bpe):
    lines = ["end\nThe", "a\n\nb", "x\n y", "我\n🚀", "it\n's", "q\n\n\nr s\nt", "\n\nlead", "tail\n",
             "a\r\nb", "a \nb", "a\n\n\n\nb c", "\n", "a\tb\n", ".\n.", "1\n2"]
    for text in lines + [" ".join(lines) * 3] + [" ".join(lines[:4]) + " x"]:
        bpe._segment_ids.clear()
        bpe._word_ids.clear()
        assert bpe.encode_array(text).tolist() == bpe.encode(text), repr(text)
        assert bpe.encode_array(text).tolist() == bpe.encode(text), repr(text)  # and from the cache


def test_bpe_fast_path_on_random_prose_like_text(bpe):
    import random
    rng = random.Random(1)
    words = ["the", "modèle", "我们", "🚀", "'s", "1984", ",", ".", "(", ")", "a", "Il", "\t", "x\u00a0y", "\x1c"]
    texts = []
    for _ in range(2000):
        pieces = [rng.choice(words) for _ in range(rng.randint(1, 12))]
        texts.append("".join(p + rng.choice([" ", " ", "\n", "", "\n\n"]) for p in pieces) + rng.choice(words))
    fast = [t for t in texts if BPETokenizer._fast_path_applies(t)]
    assert len(fast) > 500  # most of them exercise the str.split path
    for text in texts:
        assert bpe.encode_array(text).tolist() == bpe.encode(text), repr(text)


class SampledChar(CharTokenizer):
    """A mode defined outside tokenization.py: char, learnt from the bounded sample of the training text."""
    mode = "sampled_char"

    @classmethod
    def build(cls, settings, corpus):
        return cls.train("".join(corpus.sample(settings.vocab_size)))

    @classmethod
    def fingerprint(cls, settings):
        return {"mode": cls.mode, "vocab_size": settings.vocab_size}

    @classmethod
    def config_problems(cls, settings):
        return [] if settings.vocab_size <= 4096 else ["sampled_char reads at most 4096 characters"]


def test_config_modes_are_the_registry_and_a_registered_mode_needs_nothing_else(tmp_path, tiny, monkeypatch):
    assert list(CHOICES["tokenizer.mode"]) == list(TOKENIZERS) == ["char", "bpe_simple", "hf"]
    monkeypatch.setitem(TOKENIZERS, SampledChar.mode, SampledChar)
    with pytest.raises(ConfigError, match="sampled_char reads at most 4096 characters"):
        tiny(tokenizer__mode="sampled_char", tokenizer__vocab_size=5000)
    with pytest.raises(ConfigError, match="did you mean 'sampled_char'"):
        tiny(tokenizer__mode="sampled_chr")
    (tmp_path / "c.txt").write_text("ab " * 50_000 + "q" + "ab " * 50_000, encoding="utf-8")
    config = tiny(tokenizer__mode="sampled_char", tokenizer__vocab_size=2000, data__text_glob=str(tmp_path / "c.txt"))
    built = prepare_data(config, tmp_path / "cache")
    # the sample is the first 64K-char chunk: the "q" in the middle of the training text is not in it
    assert type(built.tokenizer) is SampledChar and built.tokenizer.chars == ["\ufffd", " ", "a", "b"]
    cached = prepare_data(config, tmp_path / "cache")  # restored from meta.json through the registry
    assert cached.stats["cached"] and type(cached.tokenizer) is SampledChar
    char = prepare_data(tiny(data__text_glob=str(tmp_path / "c.txt")), tmp_path / "cache")
    assert char.stats["cache"] != built.stats["cache"] and "q" in char.tokenizer.chars
    built.tokenizer.save(tmp_path / "tok")
    assert type(load_tokenizer(tmp_path / "tok")) is SampledChar
