import numpy as np
import pytest
import torch

import kernel.data as data_module
from kernel.data import BatchSampler, iterate_pieces, prepare_data
from kernel.sources import Source
from kernel.inputs import demo_sources, find_text_files
from kernel.env import KernelError
from kernel.tokenization import END_OF_DOCUMENT

FRENCH = "Il était une fois, dans un pays lointain, un modèle de langue qui apprenait à écrire. "
CHINESE = "从前有一个语言模型，它每天都在学习写作。"


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def corpus(tmp_path, documents=8, repeat=40):
    for i in range(documents):
        write(tmp_path / "text" / f"part{i % 3}" / f"doc{i}.txt", f"Document {i}. " + (FRENCH + CHINESE + "\n") * repeat)
    return str(tmp_path / "text" / "**" / "*.txt")


def test_demo_corpus_is_real_text_available_offline():
    sources = demo_sources()
    text = "".join(s.text for s in sources)
    assert len(sources) > 50 and len(text) > 300_000
    assert "for" in text and "class" in text


def test_nested_files_are_found_recursively_in_name_order(tmp_path):
    for name in ("b/deep/x.txt", "a.txt", "b/y.txt", "b/skip.md"):
        write(tmp_path / name, name)
    found = find_text_files(str(tmp_path / "**" / "*.txt"))
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.txt", "b/deep/x.txt", "b/y.txt"]


def test_no_match_lists_what_is_there(tmp_path):
    write(tmp_path / "notes.md", "hi")
    with pytest.raises(KernelError) as err:
        find_text_files(str(tmp_path / "**" / "*.txt"))
    assert "matches no file" in str(err.value) and "notes.md" in str(err.value)


def test_bom_is_stripped_invalid_bytes_counted_binary_skipped(tmp_path, tiny, capsys):
    (tmp_path / "a_bom.txt").write_bytes(("\ufeff" + "hello world " * 50).encode("utf-8"))
    (tmp_path / "b_bad.txt").write_bytes(b"ok \xff\xfe done, and \xc3 more " * 30)
    (tmp_path / "c_blob.txt").write_bytes(b"\x00\x01\x02binary")
    data = prepare_data(tiny(data__text_glob=str(tmp_path / "*.txt"), model__block_size=8), tmp_path / "cache")
    out = capsys.readouterr().out
    assert "binary (NUL bytes), not text: " in out and "c_blob.txt" in out and "b_bad.txt: 90 invalid UTF-8" in out
    assert data.stats["documents"] == 2 and data.stats["invalid_bytes"] == {str(tmp_path / "b_bad.txt"): 90}
    text = data.tokenizer.decode(np.concatenate([data.train, data.val]).tolist())
    assert text.startswith("hello world") and "\ufeff" not in text and "ok \ufffd\ufffd done" in text


def test_all_empty_files_is_an_error(tmp_path, tiny):
    write(tmp_path / "a.txt", "")
    with pytest.raises(KernelError, match=r"no usable text under .*: empty: .*a.txt"):
        prepare_data(tiny(data__text_glob=str(tmp_path / "*.txt")), tmp_path / "cache")


def test_char_split_is_the_tail_never_overlaps_and_is_stable(tmp_path, tiny):
    text = "".join(f"line {i:05d} of the corpus\n" for i in range(2000))
    write(tmp_path / "c.txt", text)
    config = tiny(data__text_glob=str(tmp_path / "c.txt"), data__val_fraction=0.1)
    data = prepare_data(config, tmp_path / "cache")
    train_text, val_text = data.tokenizer.decode(data.train.tolist()), data.tokenizer.decode(data.val.tolist())
    assert train_text + val_text == text + "<|endoftext|>"  # the document ends with the end-of-text token
    assert len(train_text) == int(len(text) * 0.9)
    again = prepare_data(config, tmp_path / "cache2")
    assert np.array_equal(again.train, data.train) and np.array_equal(again.val, data.val)
    assert data.train.dtype == np.uint16


def test_bpe_pipeline_encodes_documents_exactly_in_parallel_pieces(tmp_path, tiny, monkeypatch):
    glob_pattern = corpus(tmp_path)
    config = tiny(data__text_glob=glob_pattern, tokenizer__mode="bpe_simple", tokenizer__vocab_size=350,
                  data__workers=2, data__val_fraction=0.2)
    monkeypatch.setattr(data_module, "PIECE_CHARS", 500)  # force many pieces per document
    data = prepare_data(config, tmp_path / "cache")
    tokenizer = data.tokenizer
    assert tokenizer.mode == "bpe_simple" and data.stats["vocab_size"] == 350
    everything = np.concatenate([data.train, data.val]).tolist()
    documents = [p.read_text(encoding="utf-8") for p in find_text_files(glob_pattern)]
    expected = [i for doc in documents for i in tokenizer.encode(doc) + [tokenizer.eos_id]]
    assert everything[: data.train.size] == expected[: data.train.size]  # identical up to the split cut
    assert tokenizer.decode(everything).count(END_OF_DOCUMENT) == len(documents)
    single = prepare_data(tiny(data__text_glob=glob_pattern, tokenizer__mode="bpe_simple",
                               tokenizer__vocab_size=350, data__workers=1, data__val_fraction=0.2),
                          tmp_path / "cache-single")
    assert np.array_equal(single.train, data.train) and np.array_equal(single.val, data.val)


def test_pieces_cover_the_text_and_cut_at_the_split(tmp_path):
    sources = [Source("a", text="x" * 2500), Source("b", text="hello world " * 100)]
    pieces = list(iterate_pieces(sources, split_at=3000, piece_chars=700))
    assert "".join(p.text for p in pieces) == "x" * 2500 + "hello world " * 100
    assert all(len(p.text) <= 700 for p in pieces)
    assert sum(len(p.text) for p in pieces if p.split == "train") == 3000
    assert [p.ends_document for p in pieces].count(True) == 2


def test_cache_is_reused_and_invalidated(tmp_path, tiny):
    glob_pattern = corpus(tmp_path, documents=3)
    config = tiny(data__text_glob=glob_pattern)
    first = prepare_data(config, tmp_path / "cache")
    second = prepare_data(config, tmp_path / "cache")
    assert not first.stats["cached"] and second.stats["cached"] and first.stats["cache"] == second.stats["cache"]
    path = sorted(find_text_files(glob_pattern))[0]
    write(path, path.read_text(encoding="utf-8") + " une phrase de plus")
    changed = prepare_data(config, tmp_path / "cache")
    assert not changed.stats["cached"] and changed.stats["cache"] != first.stats["cache"]
    bpe = prepare_data(tiny(data__text_glob=glob_pattern, tokenizer__mode="bpe_simple", tokenizer__vocab_size=300),
                       tmp_path / "cache")
    assert not bpe.stats["cached"] and bpe.stats["cache"] not in (first.stats["cache"], changed.stats["cache"])


def test_an_interrupted_build_never_looks_complete(tmp_path, tiny, monkeypatch):
    config = tiny(data__text_glob=corpus(tmp_path, documents=3), data__workers=1)

    def crash(text):
        raise KeyboardInterrupt("stopped mid-build")

    monkeypatch.setattr(data_module, "encode_piece", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(config, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no partial folder left, nothing that looks complete
    monkeypatch.undo()
    assert not prepare_data(config, tmp_path / "cache").stats["cached"]


def test_vocabularies_above_65535_use_uint32(tmp_path, tiny):
    rare = "".join(chr(0x20000 + i) for i in range(70_000))  # CJK extension planes: 70,000 distinct characters
    write(tmp_path / "wide.txt", rare + "abc" * 20_000)
    data = prepare_data(tiny(data__text_glob=str(tmp_path / "wide.txt"), data__val_fraction=0.2), tmp_path / "cache")
    assert data.tokenizer.vocab_size > 65_536 and data.train.dtype == np.uint32
    assert data.tokenizer.decode(data.train[:70_000].tolist()) == rare
    assert int(data.train.max()) > 65_535


def test_validation_split_shorter_than_a_block_is_an_error(tmp_path, tiny):
    write(tmp_path / "c.txt", "x" * 200)
    with pytest.raises(KernelError, match="validation split has 21 tokens"):  # 20 characters + end-of-text
        prepare_data(tiny(data__text_glob=str(tmp_path / "c.txt")), tmp_path / "cache")


def test_sampler_is_reproducible_and_its_state_restores():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = BatchSampler(tokens, 8, 4, seed=7), BatchSampler(tokens, 8, 4, seed=7)
    x, y = a.next_batch()
    torch.testing.assert_close(x, b.next_batch()[0])
    torch.testing.assert_close(y, x + 1)  # targets are the inputs shifted by one
    state = a.state_dict()
    expected = [a.next_batch()[0] for _ in range(3)]
    c = BatchSampler(tokens, 8, 4, seed=99)
    c.load_state_dict(state)
    for batch in expected:
        torch.testing.assert_close(c.next_batch()[0], batch)
    assert not torch.equal(BatchSampler(tokens, 8, 4, seed=8).next_batch()[0], x)


def test_validation_bytes_are_exact_for_bits_per_byte(tmp_path, tiny):
    text = (FRENCH + CHINESE + "\n") * 30
    write(tmp_path / "mixed.txt", text)
    data = prepare_data(tiny(data__text_glob=str(tmp_path / "mixed.txt"), data__val_fraction=0.25), tmp_path / "cache")
    val_text = text[int(len(text) * 0.75):]
    assert data.stats["val_bytes"] == len(val_text.encode("utf-8")) > len(val_text)
    assert data.stats["val_tokens"] == len(val_text) + 1  # one char token each, plus the end-of-text token
