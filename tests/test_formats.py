"""Kaggle-style inputs: every text format, the text field, and never a training run's own outputs."""

import csv
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from kernel.inputs import list_sources
from kernel.data import prepare_data
from kernel.env import KernelError
from kernel.main import main
from tests.conftest import TINY

END = "<|endoftext|>"
LONG_CELL = "a very long review, " * 10_000  # 200 KB: over csv's default field size limit


def write_csv(path: Path, rows: list[list[str]], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


def write_jsonl(path: Path, lines: list[str], compress: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def documents_of(data) -> list[str]:
    """The documents as the token files hold them: decoded, split at the end-of-text token."""
    text = data.tokenizer.decode(np.concatenate([data.train, data.val]).tolist())
    return text.split(END)[:-1]


def every_format(root: Path) -> list[str]:
    """One folder holding each format; returns the documents in the order they are read (file-name order)."""
    root.mkdir()
    (root / "a.txt").write_text("A plain text file,\nwith two lines.", encoding="utf-8")
    (root / "b.md.gz").write_bytes(gzip.compress("# Markdown, compressed".encode("utf-8")))
    write_csv(root / "c.csv", [["id", "text", "label"], ["1", "Quoted, with a comma\nand a newline", "pos"],
                               ["2", "", "neg"], ["3", LONG_CELL, "pos"]])
    (root / "d.json").write_text(json.dumps([{"text": "json one"}, {"text": "json two", "id": 2}]), encoding="utf-8")
    write_jsonl(root / "e.jsonl.gz", [json.dumps({"content": "from a gzipped jsonl"}), "{not json",
                                      json.dumps({"content": None}), json.dumps({"content": "last record"})],
                compress=True)
    write_csv(root / "f.TSV", [["text"], ["tab\tseparated"]], delimiter="\t")
    return ["A plain text file,\nwith two lines.", "# Markdown, compressed", "Quoted, with a comma\nand a newline",
            LONG_CELL, "json one", "json two", "from a gzipped jsonl", "last record", "tab\tseparated"]


def test_every_format_is_read_record_by_record_with_counts(tmp_path, tiny):
    expected = every_format(tmp_path / "in")
    (tmp_path / "in" / "notes.pdf.gz").write_bytes(gzip.compress(b"%PDF"))
    data = prepare_data(tiny(data__text_glob=str(tmp_path / "in" / "*"), tokenizer__mode="bpe_simple",  # bytes: decodes
                             tokenizer__vocab_size=300, data__workers=1), tmp_path / "cache")       # any text exactly
    assert documents_of(data) == expected
    formats = data.stats["formats"]
    assert {k: v["documents"] for k, v in formats.items()} == {"text": 2, "csv": 2, "json": 2, "jsonl": 2, "tsv": 1}
    assert data.stats["documents"] == 9 and data.stats["files"] == 6
    assert data.stats["skipped_records"] == {"empty text": 1, "invalid JSON line": 1, "no text field": 1}
    assert data.stats["skipped_files"] == [{"path": str(tmp_path / "in" / "notes.pdf.gz"),
                                           "reason": data.stats["skipped_files"][0]["reason"]}]
    assert data.stats["skipped_files"][0]["reason"].startswith("unsupported extension")


def test_many_short_records_give_the_same_tokens_in_parallel_and_alone(tmp_path, tiny):
    lines = [json.dumps({"text": f"record number {i}: " + "words " * (i % 7)}) for i in range(3000)]
    path = write_jsonl(tmp_path / "many.jsonl", lines)
    settings = dict(data__text_glob=str(path), tokenizer__mode="bpe_simple", tokenizer__vocab_size=300)
    parallel = prepare_data(tiny(**settings, data__workers=2), tmp_path / "a")
    alone = prepare_data(tiny(**settings, data__workers=1), tmp_path / "b")
    assert np.array_equal(parallel.train, alone.train) and np.array_equal(parallel.val, alone.val)
    assert parallel.stats["documents"] == 3000
    assert int((np.concatenate([parallel.train, parallel.val]) == parallel.tokenizer.eos_id).sum()) == 3000


def test_a_dotted_text_field_reaches_into_nested_json(tmp_path, tiny):
    path = write_jsonl(tmp_path / "nested.jsonl", [json.dumps({"meta": {"body": f"body {i} " * 20, "title": "t"}})
                                                   for i in range(3)] + [json.dumps({"meta": {}})])
    data = prepare_data(tiny(data__text_glob=str(path), data__text_field="meta.body", data__val_fraction=0.3),
                        tmp_path / "cache")
    assert documents_of(data) == [f"body {i} " * 20 for i in range(3)] and data.stats["skipped_records"] == {"no text field": 1}


def test_a_csv_without_a_text_column_is_an_error_listing_its_columns(tmp_path, tiny):
    path = write_csv(tmp_path / "train.csv", [["id", "review", "stars"], ["1", "good, " * 30, "5"]])
    with pytest.raises(KernelError, match=r"train.csv: no field named 'text' or 'content'; its columns: id, "
                                          r"review, stars; set data.text_field"):
        prepare_data(tiny(data__text_glob=str(path)), tmp_path / "cache")
    with pytest.raises(KernelError, match=r"train.csv has no column 'body' \(data.text_field\); its columns: id, "
                                          r"review, stars"):
        prepare_data(tiny(data__text_glob=str(path), data__text_field="body"), tmp_path / "cache")
    data = prepare_data(tiny(data__text_glob=str(path), data__text_field="review", data__val_fraction=0.5,
                             model__block_size=16), tmp_path / "cache")
    assert documents_of(data) == ["good, " * 30]


def test_a_field_no_record_has_is_an_error_not_an_empty_corpus(tmp_path, tiny):
    path = write_jsonl(tmp_path / "a.jsonl", [json.dumps({"body": "x"})] * 3)
    with pytest.raises(KernelError, match=r"a.jsonl: no record has text \(\{'no text field': 3\}\); check "
                                          r"data.text_field \(now 'txt'\)"):
        prepare_data(tiny(data__text_glob=str(path), data__text_field="txt"), tmp_path / "cache")


def test_parquet_is_read_by_column_or_named_as_needing_pyarrow(tmp_path, tiny, monkeypatch):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed: the parquet reader is untested here")
    import pyarrow.parquet as pq
    path = tmp_path / "data.parquet"
    rows = ["row one, row two. " * 5, None, "row two, row one. " * 5]  # validation's characters occur in training
    pq.write_table(pa.table({"id": [1, 2, 3], "text": rows}), path)
    data = prepare_data(tiny(data__text_glob=str(path), data__val_fraction=0.4, model__block_size=16), tmp_path / "c")
    assert documents_of(data) == [rows[0], rows[2]] and data.stats["skipped_records"] == {"no text field": 1}
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(KernelError, match=r"data.parquet is a Parquet file, which needs the pyarrow package: pip "
                                          r"install pyarrow"):
        prepare_data(tiny(data__text_glob=str(path), data__val_fraction=0.4), tmp_path / "d")


def test_a_glob_never_reads_a_training_runs_outputs(tmp_path, tiny):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "story.txt").write_text("Once upon a time. " * 200, encoding="utf-8")
    main("llm_cpu.yaml", {"data.text_glob": str(tmp_path / "data" / "*.txt"), "model.n_layer": 1,
                          "model.n_embd": 32, "model.n_head": 2, "model.block_size": 16, "train.max_steps": 2,
                          "train.device": "cpu", "train.dtype": "float32", "sample.max_new_tokens": 5},
         out_dir=str(tmp_path / "outputs"))
    description, sources, skipped = list_sources(str(tmp_path / "**" / "*.*"))
    assert [s.path for s in sources] == [tmp_path / "data" / "story.txt"]
    reasons = {Path(path).name: why for path, why in skipped}
    assert {"samples.txt", "metrics.jsonl", "summary.json", "tokenizer.json", "config.json"} <= set(reasons)
    assert reasons["samples.txt"] == f"in a training run's output folder {tmp_path / 'outputs'}"


def test_several_text_field_names_serve_files_that_differ(tmp_path, tiny):
    write_csv(tmp_path / "in" / "a.csv", [["id", "review"], ["1", "a review, " * 10]])
    write_jsonl(tmp_path / "in" / "b.jsonl", [json.dumps({"meta": {"body": "a body. " * 10}})])
    data = prepare_data(tiny(data__text_glob=str(tmp_path / "in" / "*"), data__text_field="review, meta.body",
                             data__val_fraction=0.3, model__block_size=16), tmp_path / "cache")
    assert documents_of(data) == ["a review, " * 10, "a body. " * 10]


def test_the_text_field_is_chosen_for_each_record_so_records_that_differ_are_read_as_far_as_they_have_text(
        tmp_path, tiny):
    records = [json.dumps({"body": "a first record without text or content"})]
    records += [json.dumps({"text": f"record number {i} has its text here."}) for i in range(700)]
    records += [json.dumps({"id": 1, "content": "a content record", "title": "t"})]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    data = prepare_data(tiny(data__text_glob=str(path)), tmp_path / "cache")
    documents = documents_of(data)
    # the first record's only string field is its text; then 700 text records, then one with content
    assert len(documents) == 702 and documents[1] == "record number 0 has its text here."
    assert documents[-1] == "a content record"
    nothing = write_jsonl(tmp_path / "none.jsonl", [json.dumps({"a": "x", "b": "y"})] * 3)
    with pytest.raises(KernelError, match=r"none.jsonl: no field named 'text' or 'content'; its fields: a, b"):
        prepare_data(tiny(data__text_glob=str(nothing)), tmp_path / "cache2")
    header = write_jsonl(tmp_path / "header.jsonl", [json.dumps({"a": "x", "b": "y"})] +
                         [json.dumps({"text": f"text {i} " * 40}) for i in range(9)])
    counted = prepare_data(tiny(data__text_glob=str(header), model__block_size=8), tmp_path / "cache3")
    assert counted.stats["skipped_records"] == {"no text field": 1} and len(documents_of(counted)) == 9


def test_the_data_is_named_by_file_names_never_by_a_local_folder(tmp_path, tiny):
    home = tmp_path / "home" / "someone" / "books"
    write_jsonl(home / "wonderland.jsonl", [json.dumps({"text": "Alice " * 50})] * 30)
    (home / "looking-glass.txt").write_text("Through the looking glass. " * 200, encoding="utf-8")
    description, _, _ = list_sources(str(home / "*"))
    assert description == "2 file(s) (1 jsonl, 1 text): looking-glass.txt, wonderland.jsonl"
    summary = main("llm_cpu.yaml", {**TINY, "data.text_glob": str(home / "*")}, out_dir=str(tmp_path / "o"))
    card = (tmp_path / "o" / "hf" / "README.md").read_text(encoding="utf-8")
    assert str(tmp_path) not in summary["data"]["source"] and str(tmp_path) not in card
    assert "looking-glass.txt, wonderland.jsonl" in card


def test_an_unclosed_quote_in_a_csv_is_named_and_a_closed_multiline_cell_is_not(tmp_path, tiny, capsys):
    rows = "".join(f'{i},"review {i}, with a comma and\na second line",{i % 5}\n' for i in range(40))
    good = tmp_path / "good" / "reviews.csv"
    good.parent.mkdir()
    good.write_text("id,text,stars\n" + rows, encoding="utf-8")
    _, sources, _ = list_sources(str(good))
    assert len(list(sources[0].documents())) == 40 and "never closed" not in capsys.readouterr().out
    bad = tmp_path / "bad" / "reviews.csv"
    bad.parent.mkdir()
    bad.write_text("id,text,stars\n" + rows + '41,"this quote is never closed, 1\n42,next row,2\n43,last row,3\n')
    _, sources, _ = list_sources(str(bad))
    assert len(list(sources[0].documents())) == 41
    assert "reviews.csv: a quote opened 3 lines before the end is never closed" in capsys.readouterr().out


def test_zip_and_tar_members_are_read_by_their_own_extensions(tmp_path, tiny):
    import tarfile
    import zipfile

    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "README.md").write_text("# About this dataset\nSee corpus.zip.", encoding="utf-8")
    with zipfile.ZipFile(folder / "corpus.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("texts/a.txt", "the first text file inside the zip")
        archive.writestr("texts/b.jsonl", json.dumps({"text": "a record"}) + "\n" + json.dumps({"text": "another"}))
        archive.writestr("texts/c.csv.gz", gzip.compress(b"id,text\n1,a compressed csv row\n"))
        archive.writestr("__MACOSX/texts/._a.txt", "resource fork, not text")
        archive.writestr("texts/image.png", b"\x89PNG\x00\x00")
    member = tmp_path / "d.txt"
    member.write_text("inside a tarball", encoding="utf-8")
    with tarfile.open(folder / "more.tar.gz", "w:gz") as archive:
        archive.add(member, arcname="nested/d.txt")
    (folder / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    description, sources, skipped = list_sources(str(folder / "*"))
    assert [s.name.removeprefix(f"{folder}/") for s in sources] == [
        "README.md", "corpus.zip:texts/a.txt", "corpus.zip:texts/b.jsonl", "corpus.zip:texts/c.csv.gz",
        "more.tar.gz:nested/d.txt"]
    assert description.endswith("README.md, corpus.zip, more.tar.gz")
    assert skipped == [(str(folder / "broken.zip"), skipped[0][1])] and "a damaged archive" in skipped[0][1]
    data = prepare_data(tiny(data__text_glob=str(folder / "*"), model__block_size=8), tmp_path / "cache")
    assert documents_of(data) == ["# About this dataset\nSee corpus.zip.", "the first text file inside the zip",
                                  "a record", "another", "a compressed csv row", "inside a tarball"]
    assert data.stats["formats"]["jsonl"] == {"files": 1, "documents": 2}


def test_a_readme_beside_unreadable_data_files_is_not_trained_on(tmp_path, tiny):
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "README.md").write_text("# Sensor readings\nThe data is in readings.h5.", encoding="utf-8")
    (folder / "readings.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    with pytest.raises(KernelError, match=r"the only readable text under .* is README.md, a dataset's documentation; "
                                          r"its data files cannot be read: .*readings.h5"):
        list_sources(str(folder / "*"))
    (folder / "notes.txt").write_text("A real text file beside it.", encoding="utf-8")
    _, sources, _ = list_sources(str(folder / "*"))
    assert [s.path.name for s in sources] == ["README.md", "notes.txt"]  # with real text, the README goes along
