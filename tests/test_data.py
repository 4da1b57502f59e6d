import numpy as np
import pytest
import torch

from kernel.data import BatchSampler, demo_documents, find_text_files, load_documents, prepare_data, read_text_file
from kernel.env import KernelError


def test_demo_corpus_is_real_text_available_offline():
    documents = demo_documents()
    text = "".join(t for _, t in documents)
    assert len(documents) > 50 and len(text) > 300_000
    assert "for" in text and "class" in text


def test_nested_files_are_found_recursively_in_name_order(tmp_path):
    for name in ("b/deep/x.txt", "a.txt", "b/y.txt", "b/skip.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name, encoding="utf-8")
    found = find_text_files(str(tmp_path / "**" / "*.txt"))
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.txt", "b/deep/x.txt", "b/y.txt"]


def test_no_match_lists_what_is_there(tmp_path):
    (tmp_path / "notes.md").write_text("hi", encoding="utf-8")
    with pytest.raises(KernelError) as err:
        find_text_files(str(tmp_path / "**" / "*.txt"))
    assert "matches no file" in str(err.value) and "notes.md" in str(err.value)


def test_bom_is_stripped_invalid_bytes_replaced_binary_skipped(tmp_path, capsys):
    (tmp_path / "bom.txt").write_bytes("\ufeffhello".encode("utf-8"))
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe done")
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01\x02binary")
    assert read_text_file(tmp_path / "bom.txt") == "hello"
    assert read_text_file(tmp_path / "bad.txt") == "ok \ufffd\ufffd done"
    assert read_text_file(tmp_path / "blob.txt") is None
    out = capsys.readouterr().out
    assert "bad.txt: 2 invalid" in out and "blob.txt: it looks binary" in out


def test_all_empty_files_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(KernelError, match="empty or binary"):
        load_documents(str(tmp_path / "*.txt"))


def test_split_is_the_tail_and_never_overlaps(tmp_path, tiny):
    text = "".join(f"line {i:05d} of the corpus\n" for i in range(2000))
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    data = prepare_data(tiny(data__text_glob=str(tmp_path / "c.txt"), data__val_fraction=0.1))
    decode = data.tokenizer.decode
    train_text, val_text = decode(data.train.tolist()), decode(data.val.tolist())
    assert train_text + val_text == text
    assert len(val_text) == len(text) - int(len(text) * 0.9)
    assert data.stats["train_tokens"] + data.stats["val_tokens"] == len(text)
    assert data.train.dtype == np.uint16


def test_validation_split_shorter_than_a_block_is_an_error(tmp_path, tiny):
    (tmp_path / "c.txt").write_text("x" * 200, encoding="utf-8")
    with pytest.raises(KernelError, match="validation split has 20 tokens"):
        prepare_data(tiny(data__text_glob=str(tmp_path / "c.txt")))


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
