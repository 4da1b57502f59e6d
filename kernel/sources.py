"""## 5. Reading your text

Which files are training text, and how each format becomes documents. Everything here is streamed (a
`.json` file excepted: JSON has no streaming form), so memory stays flat however large the files are.

* **Formats**, by extension (any may end in `.gz`): plain text (`.txt`, `.md`, `.text`; a file the glob names
  with another extension is read as text too) is one document per file; `.jsonl` (or `.ndjson`), `.json`,
  `.csv`, `.tsv` and `.parquet` hold records, each one document: the field `data.text_field` names (a dotted
  name reaches into nested JSON), or else `text`, `content` or the only text field. Records without text
  are counted and skipped. Text is UTF-8 (UTF-16/32 by their BOM); a BOM is stripped, invalid bytes are
  replaced (and counted per file), binary files are skipped.
* **Finding the files**: `data.text_glob` (`**` recurses), in file-name order. Never read, even when the glob
  matches them: a training run's output folder (an earlier version attached as an input: its samples and
  logs), a notebook's kept outputs and a model's folder.
* **Empty glob**: on Kaggle every readable file of the attached datasets and competitions (attached files
  of which none is readable are an error listing them and why); elsewhere, or with nothing attached, the
  **demo corpus**: the help topics that ship inside every Python (`pydoc_data.topics`, ~465 KB of English),
  so the default run needs no download.
"""

import codecs
import collections
import contextlib
import csv
import fnmatch
import glob
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from kernel.env import RUN_OUTPUT_NAMES, KernelError, is_kaggle, kaggle_root

DEMO_CORPUS = "demo corpus: Python's built-in help topics (pydoc_data.topics)"
READ_BLOCK_CHARS = 8 << 20       # characters read from a file at a time


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
        with self.reading(), open_text(self.path) as f:
            while block := f.read(READ_BLOCK_CHARS):
                yield block

    @contextlib.contextmanager
    def reading(self):
        """A truncated or corrupt .gz file is one line naming it, not a decompressor's traceback."""
        try:
            yield
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:
            raise KernelError(f"{self.path}: a truncated or corrupt compressed file ({err}); download it again, "
                              "or leave it out of data.text_glob") from None

    def documents(self, skipped: collections.Counter | None = None) -> Iterator[Iterable[str]]:
        """Each document as an iterable of text blocks; records without text are skipped (and counted, by
        reason, into `skipped`)."""
        if self.format == "text":
            yield self.blocks()
            return
        with self.reading():
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
    row_lines: list[str] = []  # the raw lines of the row being read
    last_row: list[str] = []
    with open_text(source.path) as f:
        reader = csv.reader(recorded(f, row_lines), delimiter="\t" if source.format == "tsv" else ",")
        try:
            header = next(reader, [])
            row_lines.clear()
            column = header.index(text_field_for(source, {name: "" for name in header}, "columns"))
            for row in reader:
                last_row = row_lines[:]
                row_lines.clear()
                if row:  # csv gives [] for a blank line
                    yield row[column] if column < len(row) else None
        except csv.Error as err:
            raise KernelError(f"{source.path}, line {reader.line_num}: not readable as {source.format.upper()} "
                              f"({err})") from None
    if len(last_row) > 1 and "".join(last_row).count('"') % 2:  # an odd number of quotes: one never closed
        print(f"[data] warning: {source.path}: a quote opened {len(last_row)} lines before the end is never closed, "
              "so those lines were read as one cell; check the file's quoting")


def recorded(lines: Iterator[str], into: list[str]) -> Iterator[str]:
    for line in lines:
        into.append(line)
        yield line


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
    batches = table.iter_batches(batch_size=4096, columns=[top])
    while True:
        try:
            batch = next(batches, None)
        except Exception as err:  # noqa: BLE001 - pyarrow's errors for damaged pages (corrupt compression, ...)
            raise KernelError(f"{source.path}: a damaged Parquet file ({type(err).__name__}: {err}); download it "
                              "again, or leave it out of data.text_glob") from None
        if batch is None:
            return
        for value in batch.column(0).to_pylist():
            yield field_value({top: value}, field)


RECORD_READERS = {"jsonl": jsonl_records, "json": json_records, "csv": csv_records, "tsv": csv_records,
                  "parquet": parquet_records}
TABULAR = {"csv", "tsv", "parquet"}  # their readers yield each row's text; the others yield whole records


def text_field_for(source: Source, record: dict, kind: str = "fields") -> str:
    """The text field of a file whose fields (or columns) `record` lists, chosen as record_field chooses; a file
    without one stops the run with the fields it has."""
    field = record_field(source, record)
    if field:
        return field
    listing = f"its {kind}: {', '.join(map(str, record)) or 'none'}"
    if source.text_field:
        names = [name.strip() for name in source.text_field.split(",") if name.strip()]
        if source.format in TABULAR:
            raise KernelError(f"{source.path} has no column {' or '.join(map(repr, names))} (data.text_field); "
                              f"{listing}")
        return names[0]  # JSON: a record without the field is counted, not an error
    raise KernelError(f"{source.path}: no field named {' or '.join(map(repr, AUTO_TEXT_FIELDS))}; {listing}; set "
                      "data.text_field to the one holding the text (a dotted name reaches into nested JSON, "
                      "e.g. meta.body; several names, comma-separated, serve files that differ)")


def field_value(record, dotted: str):
    for part in dotted.split("."):
        record = record.get(part) if isinstance(record, dict) else None
    return record


def record_field(source: Source, record: dict) -> str | None:
    """The field holding this record's text: the first of data.text_field's names (comma-separated) it has;
    with none set, 'text', else 'content', else its only field with a string value. None: no such field."""
    if source.text_field:
        names = [name.strip() for name in source.text_field.split(",") if name.strip()]
        return next((name for name in names if field_value(record, name) is not None or name in record), None)
    strings = [name for name, value in record.items() if isinstance(value, str)]
    return next((name for name in AUTO_TEXT_FIELDS if name in record), strings[0] if len(strings) == 1 else None)


def record_texts(source: Source, skipped: collections.Counter) -> Iterator[str]:
    """The text of each record (a record that is a string is its own text; a list of strings is joined by
    newlines); what has none is counted in `skipped` by reason. The field is chosen for each record, so
    records that differ are read as far as they have text. A file in which no record has one is an error
    listing its fields."""
    fieldless, texts = None, 0
    for record in RECORD_READERS[source.format](source):
        if record is INVALID_JSON:
            skipped["invalid JSON line"] += 1
            continue
        value = record
        if isinstance(record, dict) and source.format not in TABULAR:
            field = record_field(source, record)
            fieldless = fieldless or (record if field is None else None)
            value = field_value(record, field) if field else None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = "\n".join(value)
        if isinstance(value, str) and value:
            texts += 1
            yield value
        else:
            skipped["no text field" if value is None else "empty text" if value == "" else "text field not text"] += 1
    if not texts and fieldless is not None:
        text_field_for(source, fieldless)  # raises, naming the fields the records have


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
    paths = unique_files(recursive_matches(pattern) if "**" in pattern else glob.glob(pattern))
    if not paths:
        raise KernelError(f"data.text_glob={pattern!r} matches no file; {describe_folder(glob_root(pattern))}")
    return paths


def recursive_matches(pattern: str) -> list[str]:
    """The files a `**` pattern matches, as glob would find them (hidden names only where the pattern names
    them), walking each real folder once: glob itself follows every symlinked folder again, so two symlink
    loops make it expand without end."""
    root = glob_root(pattern)
    wanted = Path(pattern).parts[len(root.parts):]
    found, seen = [], {os.path.realpath(root)}
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders.sort()
        kept = []
        for name in subfolders:
            real = os.path.realpath(os.path.join(folder, name))
            if real not in seen:
                seen.add(real)
                kept.append(name)
        subfolders[:] = kept
        relative = Path(folder).relative_to(root).parts
        found += [os.path.join(folder, name) for name in files if parts_match(wanted, (*relative, name))]
    return found


def parts_match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """glob's rules for one path, part by part: `**` is any number of folders, a wildcard never matches a
    name that starts with a dot unless the pattern's part does."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        for skipped in range(len(parts) + 1):
            if parts_match(pattern[1:], parts[skipped:]):
                return True
            if skipped < len(parts) and parts[skipped].startswith("."):
                return False  # ** does not enter hidden folders
        return False
    hidden_ok = pattern[0].startswith(".") or not glob.has_magic(pattern[0])
    return (bool(parts) and (hidden_ok or not parts[0].startswith(".")) and fnmatch.fnmatchcase(parts[0], pattern[0])
            and parts_match(pattern[1:], parts[1:]))


# Folders under /kaggle/input that hold other things than the user's text: earlier outputs of notebooks
# (checkpoints, samples) and model weights.
KAGGLE_NOT_TEXT = {"notebooks", "models", "kernels"}


# A folder holding two of these is a training run's output folder (this program's: an earlier version attached
# as an input, or the run's own): its samples, logs and scripts are never training text. Neither are the outputs
# Kaggle keeps of a notebook, nor a model's or a tokenizer's folder (a folder holding any of MODEL_FILES: its
# vocabulary, merges and model card would otherwise be read as text, or its JSON stop the run).
NOTEBOOK_OUTPUT_NAMES = {"__notebook__.ipynb", "__results__.html", "__output__.json"}
MODEL_FILES = {"config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model",
               "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"}


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
    if found := sorted(names & MODEL_FILES):
        return f"in the model or tokenizer folder {folder} (it holds {', '.join(found)})"
    return None


def file_verdict(path: Path, given: bool, text_field: str, folders: dict, root: Path) -> Source | str:
    """A source for the file, or why it is skipped. `given`: the user's glob named it, so a file of unknown
    extension is read as text (code, extension-less files); in a search of attached inputs it is skipped.
    The folders looked at are those from the search's `root` down (a config.json above the data, in the
    project the glob is run from, says nothing about it)."""
    root = Path(os.path.abspath(root))
    root = root.parent if root.is_file() else root
    for folder in reversed(Path(os.path.abspath(path)).parents):  # outermost first: name the whole folder left out
        if folder != root and root not in folder.parents:
            continue
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
        found += recursive_matches(str(top / "**" / "*"))
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


def public_names(paths: list[Path], limit: int = 3) -> str:
    """The data as a model card may name it: Kaggle datasets by their slug (owner/slug), other files by their
    names; never a local folder (a home directory's path would be published with the model)."""
    root = kaggle_root() / "input"
    names = []
    for path in paths:
        parts = Path(os.path.abspath(path)).parts
        inside = parts[len(root.parts):] if parts[:len(root.parts)] == root.parts else ()
        if inside[:1] == ("datasets",) and len(inside) > 3:
            name = f"{inside[1]}/{inside[2]}"
        elif inside[:1] == ("competitions",) and len(inside) > 2:
            name = f"competition {inside[1]}"
        else:
            name = f"Kaggle dataset {inside[0]}" if len(inside) > 1 else path.name
        if name not in names:
            names.append(name)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def list_sources(text_glob: str, text_field: str = "") -> tuple[str, list[Source], list[tuple[str, str]]]:
    """(a description, the documents' sources, the files skipped with why). With no glob: on Kaggle every
    supported file of the attached inputs when there are any, else the demo corpus."""
    searching = not text_glob
    if searching and not is_kaggle():
        return DEMO_CORPUS, demo_sources(), []
    paths = kaggle_input_files() if searching else find_text_files(text_glob)
    root = kaggle_root() / "input" if searching else glob_root(os.path.expanduser(text_glob))
    sources, skipped, folders = [], [], {}
    for path in paths:
        verdict = file_verdict(path, not searching, text_field, folders, root)
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
        return f"{len(sources)} file(s) ({kinds}): {public_names([s.path for s in sources])}", sources, skipped
    unusable = [(p, r) for p, r in skipped if not r.startswith("in ")]
    if searching and not unusable:
        print(f"[data] no text file under {where}: training on the demo corpus (attach a dataset, or set DATA_GLOB)")
        return DEMO_CORPUS, demo_sources(), skipped
    raise KernelError(f"no usable text under {where}: {report_skipped(skipped)}")
