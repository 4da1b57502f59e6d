"""## 5. Data

Find the text, build the tokenizer from its training part, turn both splits into token files on disk, and
serve random training windows from them. Built for corpora from one small .txt to many gigabytes:

* **Sources**: `data.text_glob` (`**` recurses), in file-name order, by extension (any may end in `.gz`):
  plain text (`.txt`, `.md`, `.text`; a file the glob names with another extension is read as text too)
  is one document per file; `.jsonl`, `.json`, `.csv`, `.tsv` and `.parquet` hold records, each one
  document: the field `data.text_field` names (a dotted name reaches into nested JSON), or else `text`,
  `content` or the only text field. Records without text are counted and skipped. Everything is streamed
  (a `.json` file excepted: JSON has no streaming form), so memory stays flat. Text is UTF-8 (UTF-16/32
  by their BOM); a BOM is stripped, invalid bytes are replaced (and counted per file), binary files are
  skipped. Never read: a training run's output folder (an earlier version attached as an input: its
  samples and logs), a notebook's kept outputs and a model's folder, even when the glob matches them.
* **Empty glob**: on Kaggle every readable file of the attached datasets and competitions (a dataset
  with nothing readable is an error listing what it holds); elsewhere, or with nothing attached, the
  **demo corpus**: the help topics that ship inside every Python (`pydoc_data.topics`, ~465 KB of
  English), so the default run needs no download.
* **Split**: the last `data.val_fraction` of the characters is validation, the rest training: the two never
  overlap and the split is the same on every run. The tokenizer learns from the training part only.
* **Tokens**: documents are encoded in pieces of about a megabyte, in parallel worker processes, and
  appended to `train.bin` / `val.bin` (uint16 when the vocabulary fits, else uint32), with the
  end-of-document token after each document (a blank line for a tokenizer that has none, such as a `char`
  vocabulary saved before `char` had one), and before each one the beginning-of-sequence token of a
  tokenizer that adds one itself (Llama's `<s>`: a pretrained model saw it there). Memory stays flat as the
  corpus grows.
* **Cache**: the token files live in a folder named by a hash of the files (path, size, mtime), the text
  field, the split and the tokenizer settings; a second run with the same inputs reuses them. It is under
  the output folder, except on Kaggle, where the output folder is kept with every version: there it is in
  the session's temporary space (`data.cache_dir` chooses another place). A build is written to a
  temporary folder and renamed when complete, so an interrupted build never looks complete.
* **Batches**: random windows of `block_size + 1` tokens from the memory-mapped files, drawn by a seeded
  `torch.Generator` whose state a checkpoint saves, so a resumed run draws exactly the batches it would have.
"""

import codecs
import collections
import contextlib
import csv
import errno
import glob
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from kernel.env import KernelError, is_kaggle, kaggle_root, process_alive, write_atomic, write_error_advice
from kernel.config import Config
from kernel.tokenization import Tokenizer, document_separator, tokenizer_class, tokenizer_from_dict

DEMO_CORPUS = "demo corpus: Python's built-in help topics (pydoc_data.topics)"
READ_BLOCK_CHARS = 8 << 20       # characters read from a file at a time
PIECE_CHARS = 1 << 20            # characters per encoding task
KAGGLE_CACHE_FOLDER = "train-gpt-token-cache"  # under the temporary folder (/tmp) on Kaggle
MAX_LISTED_SKIPS = 100           # skipped files named in summary.json (all are counted)
CACHE_FORMAT = 3                 # bump when the token files' layout changes (2: char's end-of-text token,
                                 # 3: a tokenizer's own beginning-of-sequence token before each document)


# --- Sources: files or the demo corpus -----------------------------------------------------------------

def count_invalid_bytes(error: UnicodeDecodeError) -> tuple[str, int]:
    """A codecs error handler: replace like errors='replace' and count each replacement."""
    INVALID_BYTE_COUNTS[-1] += 1
    return "\ufffd", error.end


INVALID_BYTE_COUNTS = [0]
codecs.register_error("kernel_count_invalid", count_invalid_bytes)


# Byte-order marks, longest first (UTF-32-LE's starts with UTF-16-LE's); the codecs strip them when decoding.
UNICODE_BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
                (codecs.BOM_UTF16_BE, "utf-16")]

# Formats by extension (case-insensitive, under an optional ".gz"). Plain text is one document per file; the
# others hold records, each record one document.
TEXT_EXTENSIONS = {".txt", ".md", ".text"}
RECORD_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
                  ".parquet": "parquet"}
AUTO_TEXT_FIELDS = ("text", "content")  # data.text_field empty: the first of these a file has
SUPPORTED = "text (.txt .md .text), .jsonl, .json, .csv, .tsv, .parquet, each also as .gz"


def file_format(path: Path) -> str | None:
    """'text', 'jsonl', 'json', 'csv', 'tsv' or 'parquet' by the file's extension; None when unknown."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes[-1:] == [".gz"]:
        suffixes = suffixes[:-1]
    extension = suffixes[-1] if suffixes else ""
    return "text" if extension in TEXT_EXTENSIONS else RECORD_FORMATS.get(extension)


def open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def open_text(path: Path) -> io.TextIOWrapper:
    """The file as text: gzip undone, UTF-8 unless a byte-order mark says UTF-16 or UTF-32 (as Windows tools
    often write), the BOM stripped, invalid bytes replaced by U+FFFD (and counted), line ends kept as they are."""
    raw = open_binary(path)
    head = raw.peek(4)[:4]
    encoding = next((name for bom, name in UNICODE_BOMS if head.startswith(bom)), "utf-8-sig")
    return io.TextIOWrapper(raw, encoding=encoding, errors="kernel_count_invalid", newline="")


@dataclass
class Source:
    """A file of one document (text) or of records (one document each), or one page of the demo corpus."""
    name: str
    path: Path | None = None
    text: str | None = None
    format: str = "text"
    text_field: str = ""  # data.text_field: which field of a record holds its text ("" = automatic)

    def signature(self) -> list:
        if self.path is None:
            return [self.name, len(self.text)]
        stat = self.path.stat()
        return [str(self.path), stat.st_size, stat.st_mtime_ns]

    def looks_binary(self) -> bool:
        if self.path is None or self.format != "text":
            return False
        with open_binary(self.path) as f:
            head = f.read(8192)
        return b"\x00" in head and not any(head.startswith(bom) for bom, _ in UNICODE_BOMS)  # UTF-16/32 hold NULs

    def blocks(self) -> Iterator[str]:
        """A text file's text in blocks of about READ_BLOCK_CHARS characters."""
        if self.path is None:
            yield self.text
            return
        with open_text(self.path) as f:
            while block := f.read(READ_BLOCK_CHARS):
                yield block

    def documents(self, skipped: collections.Counter | None = None) -> Iterator[Iterable[str]]:
        """Each document as an iterable of text blocks; records without text are skipped (and counted, by
        reason, into `skipped`)."""
        if self.format == "text":
            yield self.blocks()
            return
        for text in record_texts(self, skipped if skipped is not None else collections.Counter()):
            yield (text,)


# --- Records: JSON Lines, JSON, CSV/TSV, Parquet -------------------------------------------------------

INVALID_JSON = object()  # a JSON Lines line that does not parse


def jsonl_records(source: Source) -> Iterator:
    with open_text(source.path) as f:
        for line in f:
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError:
                    yield INVALID_JSON


def json_records(source: Source) -> Iterator:
    """A .json file: a list of records, or one record (read whole: JSON has no streaming form)."""
    with open_text(source.path) as f:
        try:
            data = json.load(f)
        except ValueError as err:
            raise KernelError(f"{source.path} is not valid JSON ({err}); a file of one JSON record per line "
                              "should be named .jsonl") from None
    yield from data if isinstance(data, list) else [data]


def csv_records(source: Source) -> Iterator[str | None]:
    """Each row's text cell, streamed (quoted cells may hold newlines, commas and tabs)."""
    csv.field_size_limit(2**31 - 1)  # the default (128 KB) would reject a long document
    with open_text(source.path) as f:
        reader = csv.reader(f, delimiter="\t" if source.format == "tsv" else ",")
        try:
            header = next(reader, [])
            column = header.index(text_field_for(source, {name: "" for name in header}, "columns"))
            for row in reader:
                if row:  # csv gives [] for a blank line
                    yield row[column] if column < len(row) else None
        except csv.Error as err:
            raise KernelError(f"{source.path}, line {reader.line_num}: not readable as {source.format.upper()} "
                              f"({err})") from None


def parquet_records(source: Source) -> Iterator:
    """Each row's text, read a batch at a time from its column alone (pyarrow: in Kaggle's image; locally
    `pip install pyarrow`)."""
    try:
        import pyarrow.parquet as pq
        from pyarrow import types
    except ImportError:
        raise KernelError(f"{source.path} is a Parquet file, which needs the pyarrow package: "
                          "pip install pyarrow (Kaggle's image has it)") from None
    try:
        table = pq.ParquetFile(source.path)
    except Exception as err:  # pyarrow's own error types (ArrowInvalid, ...) for a file that is not Parquet
        raise KernelError(f"{source.path} is not a readable Parquet file: {err}") from None
    columns = {f.name: "" if types.is_string(f.type) or types.is_large_string(f.type) else None
               for f in table.schema_arrow}
    field = text_field_for(source, columns, "columns")
    top = field.split(".")[0]
    for batch in table.iter_batches(batch_size=4096, columns=[top]):
        for value in batch.column(0).to_pylist():
            yield field_value({top: value}, field)


RECORD_READERS = {"jsonl": jsonl_records, "json": json_records, "csv": csv_records, "tsv": csv_records,
                  "parquet": parquet_records}
TABULAR = {"csv", "tsv", "parquet"}  # their readers yield each row's text; the others yield whole records


def text_field_for(source: Source, record: dict, kind: str = "fields") -> str:
    """The field holding the text: the first of data.text_field's names (comma-separated) the record has, else
    'text', else 'content', else the only field with a string value. A file without one stops the run with the
    fields it has."""
    listing = f"its {kind}: {', '.join(map(str, record)) or 'none'}"
    if source.text_field:
        names = [name.strip() for name in source.text_field.split(",") if name.strip()]
        present = [name for name in names if field_value(record, name) is not None or name in record]
        if source.format in TABULAR and not present:
            raise KernelError(f"{source.path} has no column {' or '.join(map(repr, names))} (data.text_field); "
                              f"{listing}")
        return (present or names)[0]  # JSON: a record without the field is counted, not an error
    found = next((name for name in AUTO_TEXT_FIELDS if name in record), None)
    strings = [name for name, value in record.items() if isinstance(value, str)]
    if found or len(strings) == 1:
        return found or strings[0]
    raise KernelError(f"{source.path}: no field named {' or '.join(map(repr, AUTO_TEXT_FIELDS))}; {listing}; set "
                      "data.text_field to the one holding the text (a dotted name reaches into nested JSON, "
                      "e.g. meta.body; several names, comma-separated, serve files that differ)")


def field_value(record, dotted: str):
    for part in dotted.split("."):
        record = record.get(part) if isinstance(record, dict) else None
    return record


def record_texts(source: Source, skipped: collections.Counter) -> Iterator[str]:
    """The text of each record (a record that is a string is its own text; a list of strings is joined by
    newlines); what has none is counted in `skipped` by reason."""
    field = None
    for record in RECORD_READERS[source.format](source):
        if record is INVALID_JSON:
            skipped["invalid JSON line"] += 1
            continue
        if isinstance(record, dict) and field is None:
            field = text_field_for(source, record)
        value = field_value(record, field) if isinstance(record, dict) and source.format not in TABULAR else record
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = "\n".join(value)
        if isinstance(value, str) and value:
            yield value
        else:
            skipped["no text field" if value is None else "empty text" if value == "" else "text field not text"] += 1


# --- Finding the files ---------------------------------------------------------------------------------

def demo_sources() -> list[Source]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise KernelError("this Python has no pydoc_data module, which holds the demo corpus; set "
                          "data.text_glob to your own text files (e.g. data.text_glob='data/**/*.txt')") from None
    return [Source(f"pydoc_data.topics[{name!r}]", text=topics[name]) for name in sorted(topics)]


def describe_folder(root: Path, limit: int = 20) -> str:
    """A short listing of what is under `root`, for 'no file matched' errors."""
    if not root.exists():
        return f"{root} does not exist"
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            entries.append(str(Path(dirpath, name)))
            if len(entries) >= limit:
                return f"under {root}: " + ", ".join(entries) + ", ..."
    return f"under {root}: " + (", ".join(entries) if entries else "no files at all")


def glob_root(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard."""
    parts = Path(pattern).parts
    fixed = parts[: next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))]
    return Path(*fixed) if fixed else Path(".")


def unique_files(paths) -> list[Path]:
    """Existing files in name order, each real file once: a symlink loop under '**' (or a link beside its
    target) would otherwise read the same text many times, and copies would leak into validation."""
    seen, unique = set(), []
    for path in sorted(Path(p) for p in paths):
        if path.is_file() and (real := os.path.realpath(path)) not in seen:
            seen.add(real)
            unique.append(path)
    return unique


def find_text_files(pattern: str) -> list[Path]:
    pattern = os.path.expanduser(pattern)
    if os.path.isfile(pattern):  # an existing path is taken literally, even with [ ] or * in its name
        return [Path(pattern)]
    paths = unique_files(glob.glob(pattern, recursive=True))
    if not paths:
        raise KernelError(f"data.text_glob={pattern!r} matches no file; {describe_folder(glob_root(pattern))}")
    return paths


# Folders under /kaggle/input that hold other things than the user's text: earlier outputs of notebooks
# (checkpoints, samples) and model weights.
KAGGLE_NOT_TEXT = {"notebooks", "models", "kernels"}


# A folder holding two of these is a training run's output folder (this program's: an earlier version attached
# as an input, or the run's own): its samples, logs and scripts are never training text. So are the outputs
# Kaggle keeps of a notebook and a model's folder (its vocabulary files, model card).
RUN_OUTPUT_NAMES = {"summary.json", "metrics.jsonl", "samples.txt", "loss.png", "checkpoints", "config.yaml",
                    "train_gpt_program.py"}
NOTEBOOK_OUTPUT_NAMES = {"__notebook__.ipynb", "__results__.html", "__output__.json"}
MODEL_NAMES = {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "tokenizer.json",
               "pytorch_model.bin.index.json"}


def folder_not_text(folder: Path) -> str | None:
    """Why nothing under `folder` is training text, or None."""
    try:
        names = set(os.listdir(folder))
    except OSError:
        return None
    if len(names & RUN_OUTPUT_NAMES) >= 2:
        return f"in a training run's output folder {folder}"
    if names & NOTEBOOK_OUTPUT_NAMES:
        return f"in a notebook's kept output folder {folder}"
    if "config.json" in names and names & MODEL_NAMES:
        return f"in the model folder {folder}"
    return None


def file_verdict(path: Path, given: bool, text_field: str, folders: dict) -> Source | str:
    """A source for the file, or why it is skipped. `given`: the user's glob named it, so a file of unknown
    extension is read as text (code, extension-less files); in a search of attached inputs it is skipped."""
    for folder in reversed(Path(os.path.abspath(path)).parents):  # outermost first: name the whole folder left out
        if folder not in folders:
            folders[folder] = folder_not_text(folder)
        if folders[folder]:
            return folders[folder]
    kind = file_format(path) or ("text" if given and path.suffix.lower() != ".gz" else None)
    if kind is None:
        return f"unsupported extension (read: {SUPPORTED})"
    if path.stat().st_size == 0:
        return "empty"
    source = Source(str(path), path=path, format=kind, text_field=text_field)
    return "binary (NUL bytes), not text" if source.looks_binary() else source


def kaggle_input_files() -> list[Path]:
    """Every file of the datasets and competitions attached to a Kaggle notebook, in both layouts:
    /kaggle/input/datasets/<owner>/<slug>/... (2026) and /kaggle/input/<slug>/... (older)."""
    root = kaggle_root() / "input"
    if not root.is_dir():
        return []
    found = []
    for top in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in KAGGLE_NOT_TEXT):
        found += glob.glob(str(top / "**" / "*"), recursive=True)
    return unique_files(found)


def report_skipped(skipped: list[tuple[str, str]], limit: int = 5) -> str:
    """The skipped files by reason: 'empty: a.txt, b.txt; 57 files in the output folder X'."""
    by_reason: dict[str, list[str]] = {}
    for path, reason in skipped:
        by_reason.setdefault(reason, []).append(path)
    entries = []
    for reason, paths in by_reason.items():
        if reason.startswith("in "):  # a whole folder left out: its files need no listing
            entries.append(f"{len(paths)} file(s) {reason}")
        else:
            more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
            entries.append(f"{reason}: {', '.join(paths[:limit])}{more}")
    return "; ".join(entries)


def list_sources(text_glob: str, text_field: str = "") -> tuple[str, list[Source], list[tuple[str, str]]]:
    """(a description, the documents' sources, the files skipped with why). With no glob: on Kaggle every
    supported file of the attached inputs when there are any, else the demo corpus."""
    searching = not text_glob
    if searching and not is_kaggle():
        return DEMO_CORPUS, demo_sources(), []
    paths = kaggle_input_files() if searching else find_text_files(text_glob)
    sources, skipped, folders = [], [], {}
    for path in paths:
        verdict = file_verdict(path, not searching, text_field, folders)
        if isinstance(verdict, Source):
            sources.append(verdict)
        else:
            skipped.append((str(path), verdict))
    where = f"{kaggle_root() / 'input'}" if searching else repr(text_glob)
    if skipped:
        print(f"[data] skipped {len(skipped)} file(s) under {where}: {report_skipped(skipped)}")
    if sources:
        counts = collections.Counter(s.format for s in sources)
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
        if searching:
            print(f"[data] data.text_glob is empty: using the attached inputs' files ({kinds})")
        description = f"{len(sources)} file(s) ({kinds}) {'attached under' if searching else 'matching'} {where}"
        return description, sources, skipped
    unusable = [(p, r) for p, r in skipped if not r.startswith("in ")]
    if searching and not unusable:
        print(f"[data] no text file under {where}: training on the demo corpus (attach a dataset, or set DATA_GLOB)")
        return DEMO_CORPUS, demo_sources(), skipped
    raise KernelError(f"no usable text under {where}: {report_skipped(skipped)}")


# --- The corpus as one stream of characters ------------------------------------------------------------

@dataclass
class Piece:
    """Consecutive text of one split, encoded as one task: every text but the last ends a document (so many
    short records travel together); the last one ends a document when `ends_document` says so."""
    split: str           # "train" or "val"
    texts: list[str]
    ends_document: bool

    @property
    def text(self) -> str:
        return "".join(self.texts)


def measure(sources: list[Source]) -> dict:
    """One streaming pass: characters, documents (per format), bytes, invalid bytes, records without text."""
    found = {"chars": 0, "documents": 0, "bytes": 0, "invalid_bytes": {}, "formats": {}, "skipped_records": {}}
    skipped_records = collections.Counter()
    for source in sources:
        INVALID_BYTE_COUNTS.append(0)
        skipped, documents = collections.Counter(), 0
        for document in source.documents(skipped):
            length = sum(len(block) for block in document)
            documents, found["chars"] = documents + (length > 0), found["chars"] + length
        if count := INVALID_BYTE_COUNTS.pop():
            found["invalid_bytes"][source.name] = count
            print(f"[data] {source.name}: {count} invalid UTF-8 byte sequence(s) replaced by U+FFFD")
        if source.format != "text" and not documents:
            raise KernelError(f"{source.path}: no record has text ({dict(skipped) or 'no records'}); check "
                              f"data.text_field (now {source.text_field or 'automatic'!r})")
        skipped_records.update(skipped)
        per_format = found["formats"].setdefault(source.format if source.path else "demo", {"files": 0, "documents": 0})
        per_format["files"] += source.path is not None
        per_format["documents"] += documents
        found["documents"] += documents
        found["bytes"] += source.path.stat().st_size if source.path else len(source.text.encode("utf-8"))
    found["skipped_records"] = dict(skipped_records)
    if skipped_records:
        print(f"[data] records skipped: {', '.join(f'{n:,} {why}' for why, n in skipped_records.items())}")
    return found


def safe_cut(text: str, limit: int) -> int:
    """A cut point near `limit`: before a space that follows a non-space (where no BPE pre-token is split),
    else after a newline, else `limit` itself."""
    for position in range(limit, max(0, limit - 4096), -1):
        if text[position] == " " and not text[position - 1].isspace():
            return position
    newline = text.rfind("\n", 0, limit)
    return newline + 1 if newline > 0 else limit


def fragments(sources: list[Source], split_at: int, piece_chars: int) -> Iterator[tuple[str, str, bool]]:
    """(split, text, ends_document): each document cut into fragments of at most piece_chars characters,
    and at the split; characters before `split_at` are training."""
    offset = 0
    for source in sources:
        for document in source.documents():
            buffer = ""
            for block in document:
                buffer += block
                while len(buffer) > piece_chars or (offset < split_at < offset + len(buffer)):
                    if offset < split_at < offset + len(buffer) and split_at - offset <= piece_chars:
                        cut = split_at - offset
                    else:
                        cut = safe_cut(buffer, piece_chars)
                    yield "train" if offset < split_at else "val", buffer[:cut], False
                    buffer, offset = buffer[cut:], offset + cut
            if buffer:
                yield "train" if offset < split_at else "val", buffer, True
                offset += len(buffer)


def iterate_pieces(sources: list[Source], split_at: int, piece_chars: int | None = None) -> Iterator[Piece]:
    """The corpus as pieces of at most piece_chars characters, short documents packed together."""
    piece_chars = piece_chars or PIECE_CHARS
    texts, size, split = [], 0, "train"
    for fragment_split, text, ends_document in fragments(sources, split_at, piece_chars):
        if texts and (fragment_split != split or size + len(text) > piece_chars):
            yield Piece(split, texts, True)  # what was waiting ends documents: an open one is yielded at once
            texts, size = [], 0
        texts, size, split = texts + [text], size + len(text), fragment_split
        if not ends_document:
            yield Piece(split, texts, False)
            texts, size = [], 0
    if texts:
        yield Piece(split, texts, True)


def training_text_sample(sources: list[Source], split_at: int, max_chars: int, chunk_chars: int = 1 << 16):
    """The training text when it is small, else evenly spaced chunks adding up to about max_chars."""
    texts = (text for p in iterate_pieces(sources, split_at) if p.split == "train" for text in p.texts)
    if split_at <= max_chars:
        yield from texts
        return
    stride = split_at // max(1, max_chars // chunk_chars)
    offset, next_start = 0, 0
    for text in texts:
        while next_start < offset + len(text):
            local = next_start - offset
            yield text[local : local + chunk_chars]
            next_start += stride
        offset += len(text)


@dataclass
class TrainingText:
    """The training split as a tokenizer learns from it (tokenization's TrainingCorpus), read on demand:
    one string per document (or per part of a long one)."""
    sources: list[Source]
    split_at: int

    def pieces(self) -> Iterator[str]:
        return (text for piece in iterate_pieces(self.sources, self.split_at) if piece.split == "train"
                for text in piece.texts)

    def sample(self, max_chars: int) -> Iterator[str]:
        return training_text_sample(self.sources, self.split_at, max_chars)


def train_tokenizer(config: Config, sources: list[Source], split_at: int) -> Tokenizer:
    settings = config.tokenizer
    return tokenizer_class(settings.mode, "in tokenizer.mode").build(settings, TrainingText(sources, split_at))


# --- Encoding in parallel, into token files ------------------------------------------------------------

def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 2**16 else np.uint32


WORKER_TOKENIZER: list = []  # [tokenizer, separator ids, start ids], inherited by each worker process through fork


def separator_ids(tokenizer: Tokenizer) -> np.ndarray:
    """What follows each document: the end-of-text token, or a blank line for a tokenizer without one."""
    dtype = token_dtype(tokenizer.vocab_size)
    if tokenizer.eos_id is not None:
        return np.array([tokenizer.eos_id], dtype=dtype)
    return np.asarray(tokenizer.encode(document_separator(tokenizer)), dtype=dtype)


def document_start_ids(tokenizer: Tokenizer) -> np.ndarray:
    """What precedes each document: the tokenizer's own beginning-of-sequence token (a pretrained Llama saw
    one before every document), else nothing."""
    return np.array([] if tokenizer.bos_id is None else [tokenizer.bos_id], dtype=token_dtype(tokenizer.vocab_size))


def encode_text(tokenizer: Tokenizer, text: str) -> np.ndarray:
    if hasattr(tokenizer, "encode_array"):
        return tokenizer.encode_array(text)
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def encode_piece(piece: tuple[list[str], bool, bool]) -> np.ndarray:
    """A piece's ids (texts, starts_document, ends_document): the start ids before every document it starts,
    the separator after every document it ends."""
    tokenizer, separator, start = WORKER_TOKENIZER
    texts, starts_document, ends_document = piece
    parts = []
    for number, text in enumerate(texts, start=1):
        if number > 1 or starts_document:
            parts.append(start)
        parts.append(encode_text(tokenizer, text).astype(separator.dtype))
        if number < len(texts) or ends_document:
            parts.append(separator)
    return np.concatenate(parts)


def worker_count(requested: int) -> int:
    """0 means one worker per usable CPU. Workers need fork (Linux): a notebook's functions cannot be
    pickled into spawned processes."""
    if sys.platform != "linux":
        return 1
    available = len(os.sched_getaffinity(0))
    return max(1, min(requested or available, available))


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def quiet_worker() -> None:
    """In a worker: die silently when the terminal sends Ctrl-C or the platform a SIGTERM (the parent
    handles stops). Workers are born with these signals blocked (see `start_workers`): until this runs
    they would run the parent's handler and print its traceback. A signal that came meanwhile is
    delivered on unblocking."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def start_workers(workers: int) -> ProcessPoolExecutor:
    """A fork pool (a notebook's functions cannot be pickled into spawned processes) with its workers
    started now, under blocked stop signals: a fork pool starts every worker at its first task. Not
    multiprocessing.Pool: its terminate() can kill a worker holding a result queue's lock and then wait
    for that lock forever, and it hangs when the system kills a worker; this executor reports that."""
    pool = ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("fork"), initializer=quiet_worker)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        pool.submit(int)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return pool


def ordered_map(function, items: Iterator, workers: int, window: int = 8) -> Iterator:
    """function(item) for each item, in order, with at most `window` pieces per worker in flight (bounded
    memory). An error or a stop cancels the pieces not started and waits for the few that are running:
    workers are never killed mid-task."""
    if workers <= 1:
        yield from map(function, items)
        return
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism; no Rust thread pools
    pool = start_workers(workers)
    try:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise KernelError("a tokenizing worker process died (the system kills the largest process when "
                          "memory runs out); set data.workers to fewer processes, or 1 to tokenize in "
                          "this process") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def write_token_files(sources: list[Source], split_at: int, tokenizer: Tokenizer, folder: Path,
                      workers: int) -> dict:
    """Encode every piece into folder/train.bin and folder/val.bin; returns token counts per split and the
    validation text's size in bytes."""
    counts = {"train": 0, "val": 0, "val_bytes": 0}
    WORKER_TOKENIZER[:] = [tokenizer, separator_ids(tokenizer), document_start_ids(tokenizer)]
    in_flight: collections.deque = collections.deque()  # the split of each piece being encoded

    def pieces() -> Iterator[tuple[list[str], bool, bool]]:
        starts_document = True  # the corpus begins with a document; later, a piece starts one when the last ended one
        for piece in iterate_pieces(sources, split_at):
            in_flight.append(piece.split)
            if piece.split == "val":  # bits per byte needs the validation text's size in bytes
                counts["val_bytes"] += sum(len(text.encode("utf-8")) for text in piece.texts)
            yield piece.texts, starts_document, piece.ends_document
            starts_document = piece.ends_document

    with open(folder / "train.bin", "wb") as train_file, open(folder / "val.bin", "wb") as val_file:
        files = {"train": train_file, "val": val_file}
        for ids in ordered_map(encode_piece, pieces(), workers):
            split = in_flight.popleft()
            files[split].write(ids.tobytes())
            counts[split] += int(ids.size)
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    return counts


# --- The cache -----------------------------------------------------------------------------------------

def tokenizer_fingerprint(config: Config, tokenizer: Tokenizer | None) -> str:
    """What decides the tokenizer, in the cache key: a given one's state (hashed), else the settings."""
    if tokenizer is not None:
        state = tokenizer.state_fingerprint()
        return "given:" + hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
    settings = config.tokenizer
    return json.dumps(tokenizer_class(settings.mode, "in tokenizer.mode").fingerprint(settings), sort_keys=True)


def cache_key(sources: list[Source], config: Config, tokenizer: Tokenizer | None) -> str:
    description = {"format": CACHE_FORMAT, "sources": [s.signature() for s in sources],
                   "text_field": config.data.text_field,
                   "val_fraction": config.data.val_fraction, "tokenizer": tokenizer_fingerprint(config, tokenizer),
                   "python": platform.python_version() if sources and sources[0].path is None else ""}
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class TokenData:
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    stats: dict = field(default_factory=dict)

    @property
    def val_tokens_per_byte(self) -> float:
        return self.stats["val_tokens"] / max(1, self.stats["val_bytes"])


def load_cached(folder: Path) -> TokenData:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    tokenizer = tokenizer_from_dict(meta["tokenizer"])
    dtype = token_dtype(tokenizer.vocab_size)
    splits = {}
    for split in ("train", "val"):
        size = (folder / f"{split}.bin").stat().st_size // np.dtype(dtype).itemsize
        if size != meta["stats"][f"{split}_tokens"]:
            raise KernelError(f"token cache {folder} is damaged ({split}.bin has {size} tokens, expected "
                              f"{meta['stats'][f'{split}_tokens']}); delete the folder to rebuild it")
        splits[split] = np.memmap(folder / f"{split}.bin", dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    return TokenData(tokenizer, splits["train"], splits["val"], meta["stats"])


def build_cache(sources: list[Source], config: Config, tokenizer: Tokenizer | None, folder: Path,
                source_description: str) -> None:
    """Measure, split, train the tokenizer, encode; everything in a temporary folder renamed at the end."""
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    try:
        found = measure(sources)
        if found["chars"] == 0:
            raise KernelError(f"{source_description}: every file is empty")
        split_at = int(found["chars"] * (1 - config.data.val_fraction))
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        started = time.perf_counter()
        if tokenizer is None:
            tokenizer = train_tokenizer(config, sources, split_at)
        tokenizer_seconds, started = time.perf_counter() - started, time.perf_counter()
        counts = write_token_files(sources, split_at, tokenizer, staging, worker_count(config.data.workers))
        encode_seconds = time.perf_counter() - started
        stats = {"source": source_description, "files": sum(s.path is not None for s in sources), **found,
                 "train_tokens": counts["train"], "val_tokens": counts["val"],
                 "val_bytes": counts["val_bytes"], "vocab_size": tokenizer.vocab_size,
                 "tokenizer_seconds": round(tokenizer_seconds, 2), "encode_seconds": round(encode_seconds, 2)}
        write_atomic(staging / "meta.json", json.dumps({"stats": stats, "tokenizer": tokenizer.to_dict()}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError):
            raise cache_os_error(err, staging, folder) from None
        raise


def cache_os_error(err: OSError, staging: Path, folder: Path) -> KernelError:
    """A failed write of the token cache (full disk, no permission), or a source file that cannot be read."""
    written = err.filename is None or Path(err.filename).is_relative_to(staging) or Path(err.filename) == folder
    if err.errno in (errno.ENOSPC, errno.EDQUOT) or written:
        return KernelError(f"could not write the token cache in {folder.parent}: {err.strerror or err}; "
                           f"{write_error_advice(err)}, or set data.cache_dir to a folder with more room")
    return KernelError(f"could not read {err.filename}: {err.strerror or err}")


def cache_location(cache_dir: str, out_dir: Path) -> tuple[Path, bool]:
    """Where the token files go, and whether that folder is the output folder's own (which the run prunes).
    On Kaggle not under /kaggle/working: that is kept as the version's output (20 GB at most), and the
    cache is rebuilt in seconds."""
    if cache_dir:
        return Path(cache_dir), False
    if is_kaggle():
        return Path(tempfile.gettempdir()) / KAGGLE_CACHE_FOLDER, False
    return out_dir / "cache", True


def remove_cache_debris(cache_root: Path, keep: Path | None) -> None:
    """Half-built caches of runs that died (their process is gone) and, when `keep` is given (a cache folder
    private to this output folder), every other complete cache, which this run will never read."""
    for entry in sorted(cache_root.glob("tokens-*")) if cache_root.is_dir() else []:
        pid = entry.name.rpartition(".partial-")[2]
        stale_partial = ".partial-" in entry.name and pid.isdigit() and not process_alive(int(pid))
        superseded = keep is not None and ".partial-" not in entry.name and entry != keep
        if stale_partial or superseded:
            shutil.rmtree(entry, ignore_errors=True)


def cached_with(folder: Path, tokenizer: Tokenizer) -> bool:
    """Whether the cache in `folder` was encoded with exactly this tokenizer."""
    try:
        return json.loads((folder / "meta.json").read_text(encoding="utf-8"))["tokenizer"] == tokenizer.to_dict()
    except (OSError, ValueError, KeyError):
        return False


def prepare_data(config: Config, cache_root: str | Path, tokenizer: Tokenizer | None = None,
                 private: bool = False) -> TokenData:
    """Token files for this corpus, split and tokenizer: from the cache, or built now. Pass a checkpoint's
    tokenizer to resume with the same vocabulary: the cache the run started with is reused when it holds
    that tokenizer. `private`: the cache root belongs to this output folder alone (superseded caches and a
    cache too short to train on are removed)."""
    started, cache_root = time.perf_counter(), Path(cache_root)
    description, sources, skipped = list_sources(config.data.text_glob, config.data.text_field)
    folder = cache_root / f"tokens-{cache_key(sources, config, None)}"  # the same key before and after a resume
    if tokenizer is not None and not cached_with(folder, tokenizer):
        folder = cache_root / f"tokens-{cache_key(sources, config, tokenizer)}"
    cached = (folder / "meta.json").is_file()
    if not cached:
        remove_cache_debris(cache_root, None)
        build_cache(sources, config, tokenizer, folder, description)
    data = load_cached(folder)
    data.stats.update(source=description, seconds=round(time.perf_counter() - started, 2), cache=str(folder),
                      cached=cached,
                      skipped_files=[{"path": path, "reason": why} for path, why in skipped[:MAX_LISTED_SKIPS]],
                      skipped_files_total=len(skipped))
    try:
        check_split_lengths(data, config.model.block_size)
    except KernelError:
        if private and not cached:
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):
                cache_root.rmdir()  # only if empty
        raise
    if private and not cached:  # only once the new cache is usable: a failed try keeps the old one
        remove_cache_debris(cache_root, folder)
    return data


def check_split_lengths(data: TokenData, block_size: int) -> None:
    for split, tokens in (("train", data.train), ("validation", data.val)):
        if tokens.size < block_size + 2:
            raise KernelError(
                f"the {split} split has {tokens.size} tokens, fewer than one window of model.block_size+1 = "
                f"{block_size + 1}; add text, lower model.block_size, or change data.val_fraction")


def print_data_report(data: TokenData) -> None:
    s = data.stats
    print(f"[data] {s['source']}: {s['documents']} documents, {s['bytes']:,} bytes, {s['chars']:,} characters, "
          f"vocab {s['vocab_size']:,}"
          f"{' (invalid UTF-8 replaced in ' + str(len(s['invalid_bytes'])) + ' file(s))' if s['invalid_bytes'] else ''}")
    print(f"[data] tokens: train {s['train_tokens']:,} | val {s['val_tokens']:,} | "
          f"{data.val_tokens_per_byte:.3f} tokens/byte | {'cached' if s['cached'] else 'built'} in {s['seconds']:.1f}s"
          f" ({s['cache']})")


# --- Batches -------------------------------------------------------------------------------------------

class BatchSampler:
    """Random windows from one split; its state (the generator's) is saved in checkpoints."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, block_size) int64; targets are inputs shifted by one."""
        return self.windows(self.draw(self.batch_size))

    def draw(self, count: int) -> torch.Tensor:
        """Start positions of the next `count` windows. Drawing 8 at once gives the same starts as drawing
        4 twice, so how a step's sequences are cut into micro-batches or shared among processes never
        changes which sequences the step trains on."""
        return torch.randint(self.tokens.size - self.block_size, (count,), generator=self.generator)

    def windows(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        windows = np.stack([self.tokens[s : s + self.block_size + 1] for s in starts.tolist()])
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
