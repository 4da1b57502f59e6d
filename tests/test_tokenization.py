import pytest

from kernel.env import KernelError
from kernel.tokenization import CharTokenizer, load_tokenizer, tokenizer_from_dict

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog.\n",
    "french": "Où est la bibliothèque ? Ça coûte très cher, déjà.\n",
    "chinese": "我们在卡格尔上从零开始训练一个语言模型。\n",
    "emoji": "rocket 🚀, family 👨‍👩‍👧, flag 🇫🇷\n",
}


@pytest.mark.parametrize("name", TEXTS)
def test_round_trip(name):
    text = "".join(TEXTS.values())
    tokenizer = CharTokenizer.train(text)
    ids = tokenizer.encode(TEXTS[name])
    assert len(ids) == len(TEXTS[name]) and 0 not in ids
    assert tokenizer.decode(ids) == TEXTS[name]


def test_vocabulary_is_sorted_and_independent_of_text_order():
    a, b = CharTokenizer.train("banana split"), CharTokenizer.train("split banana")
    assert a.chars == b.chars == ["\ufffd", " ", "a", "b", "i", "l", "n", "p", "s", "t"]
    assert a.vocab_size == 10


def test_unseen_characters_become_the_unknown_token():
    tokenizer = CharTokenizer.train("abc")
    assert tokenizer.encode("abzc") == [1, 2, 0, 3]
    assert tokenizer.decode(tokenizer.encode("abzc")) == "ab\ufffdc"
    assert tokenizer.decode([999]) == "\ufffd"  # out-of-range ids never crash either


def test_save_and_load(tmp_path):
    tokenizer = CharTokenizer.train(TEXTS["french"] + TEXTS["chinese"])
    tokenizer.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.chars == tokenizer.chars
    assert loaded.encode(TEXTS["chinese"]) == tokenizer.encode(TEXTS["chinese"])
    assert tokenizer_from_dict(tokenizer.to_dict()).chars == tokenizer.chars


def test_empty_training_text_is_an_error(tmp_path):
    with pytest.raises(KernelError, match="empty"):
        CharTokenizer.train("")
    with pytest.raises(KernelError, match="no saved tokenizer"):
        load_tokenizer(tmp_path)
