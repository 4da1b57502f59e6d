"""## 6. Reading your text

How each file becomes documents. Everything here is streamed (a `.json` file excepted: JSON has no streaming
form), so memory stays flat however large the files are.

* **Formats**, by extension (any may end in `.gz`, and any may be a member of a `.zip` or `.tar` archive):
  plain text (`.txt`, `.md`, `.text`; a file the glob names with another extension is read as text too) is
  one document per file; `.jsonl` (or `.ndjson`), `.json`, `.csv`, `.tsv` and `.parquet` hold records, each
  one document.
* **The text of a record**: the field `data.text_field` names (a dotted name reaches into nested JSON;
  several names, comma-separated, the first a record has), or else `text`, `content` or its only text field,
  chosen for each record. Records without text are counted and skipped.
* **Text** is UTF-8 (UTF-16/32 by their BOM); a BOM is stripped, invalid bytes are replaced (and counted per
  file), binary files are skipped. A truncated or damaged compressed file is one error naming it.
"""

import codecs
import collections
import contextlib
import csv
import gzip
import io
import json
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from kernel.env import KernelError

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
SUPPORTED = "text (.txt .md .text), .jsonl, .json, .csv, .tsv, .parquet, each also as .gz, and in .zip or .tar"


ARCHIVE_EXTENSIONS = (".zip", ".tar", ".tar.gz", ".tgz")  # their members are read by their own extensions


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_EXTENSIONS)


def file_format(path: Path) -> str | None:
    """'text', 'jsonl', 'json', 'csv', 'tsv' or 'parquet' by the file's extension; None when unknown."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes[-1:] == [".gz"]:
        suffixes = suffixes[:-1]
    extension = suffixes[-1] if suffixes else ""
    return "text" if extension in TEXT_EXTENSIONS else RECORD_FORMATS.get(extension)


def open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def open_member(archive: Path, member: str):
    """One file inside a .zip or .tar archive, streamed (gzip undone when the member's name ends in .gz)."""
    if archive.name.lower().endswith(".zip"):
        raw = zipfile.ZipFile(archive).open(member)
    else:
        raw = tarfile.open(archive, "r:*").extractfile(member)
    return gzip.GzipFile(fileobj=raw) if member.lower().endswith(".gz") else io.BufferedReader(raw)


def open_text(path: Path, member: str = "") -> io.TextIOWrapper:
    """The file (or an archive's member) as text: gzip undone, UTF-8 unless a byte-order mark says UTF-16 or
    UTF-32 (as Windows tools often write), the BOM stripped, invalid bytes replaced by U+FFFD (and counted),
    line ends kept as they are."""
    raw = open_member(path, member) if member else open_binary(path)
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
    member: str = ""      # a file inside the archive at `path`
    member_size: int = 0

    def signature(self) -> list:
        if self.path is None:
            return [self.name, len(self.text)]
        stat = self.path.stat()
        return [str(self.path), stat.st_size, stat.st_mtime_ns] + ([self.member] if self.member else [])

    def size(self) -> int:
        """Bytes as stored (an archive's member: uncompressed)."""
        return self.member_size if self.member else self.path.stat().st_size

    def open_text(self) -> io.TextIOWrapper:
        return open_text(self.path, self.member)

    def looks_binary(self) -> bool:
        if self.path is None or self.format != "text":
            return False
        with (open_member(self.path, self.member) if self.member else open_binary(self.path)) as f:
            head = f.read(8192)
        return b"\x00" in head and not any(head.startswith(bom) for bom, _ in UNICODE_BOMS)  # UTF-16/32 hold NULs

    def blocks(self) -> Iterator[str]:
        """A text file's text in blocks of about READ_BLOCK_CHARS characters."""
        if self.path is None:
            yield self.text
            return
        with self.reading(), self.open_text() as f:
            while block := f.read(READ_BLOCK_CHARS):
                yield block

    @contextlib.contextmanager
    def reading(self):
        """A truncated or corrupt .gz file is one line naming it, not a decompressor's traceback."""
        try:
            yield
        except (EOFError, zlib.error, gzip.BadGzipFile, zipfile.BadZipFile, tarfile.TarError) as err:
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
    with source.open_text() as f:
        for line in f:
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError:
                    yield INVALID_JSON


def json_records(source: Source) -> Iterator:
    """A .json file: a list of records, or one record (read whole: JSON has no streaming form)."""
    with source.open_text() as f:
        try:
            data = json.load(f)
        except ValueError as err:
            raise KernelError(f"{source.name} is not valid JSON ({err}); a file of one JSON record per line "
                              "should be named .jsonl") from None
    yield from data if isinstance(data, list) else [data]


def csv_records(source: Source) -> Iterator[str | None]:
    """Each row's text cell, streamed (quoted cells may hold newlines, commas and tabs)."""
    csv.field_size_limit(2**31 - 1)  # the default (128 KB) would reject a long document
    row_lines: list[str] = []  # the raw lines of the row being read
    last_row: list[str] = []
    with source.open_text() as f:
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
            raise KernelError(f"{source.name}, line {reader.line_num}: not readable as {source.format.upper()} "
                              f"({err})") from None
    if len(last_row) > 1 and "".join(last_row).count('"') % 2:  # an odd number of quotes: one never closed
        print(f"[data] warning: {source.name}: a quote opened {len(last_row)} lines before the end is never closed, "
              "so those lines were read as one cell; check the file's quoting")


def recorded(lines: Iterator[str], into: list[str]) -> Iterator[str]:
    for line in lines:
        into.append(line)
        yield line


def parquet_records(source: Source) -> Iterator:
    """Each row's text, read a batch at a time from its column alone (pyarrow: in Kaggle's image; locally
    `pip install pyarrow`)."""
    table = parquet_file(source)  # first: without pyarrow, its message
    from pyarrow import types

    columns = {f.name: "" if types.is_string(f.type) or types.is_large_string(f.type) else None
               for f in table.schema_arrow}
    field = text_field_for(source, columns, "columns")
    top = field.split(".")[0]
    for batch in parquet_batches(source, [top], table):
        for value in batch.column(0).to_pylist():
            yield field_value({top: value}, field)


def parquet_file(source: Source):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise KernelError(f"{source.name} is a Parquet file, which needs the pyarrow package: "
                          "pip install pyarrow (Kaggle's image has it)") from None
    try:
        return pq.ParquetFile(io.BytesIO(open_member(source.path, source.member).read()) if source.member else source.path)
    except Exception as err:  # pyarrow's own error types (ArrowInvalid, ...) for a file that is not Parquet
        raise KernelError(f"{source.name} is not a readable Parquet file: {' '.join(str(err).split())}") from None


def parquet_batches(source: Source, columns: list[str] | None, table=None) -> Iterator:
    """The file's record batches (of `columns`, or all), a damaged page one error naming the file."""
    batches = (table or parquet_file(source)).iter_batches(batch_size=4096, columns=columns)
    while True:
        try:
            batch = next(batches, None)
        except Exception as err:  # noqa: BLE001 - pyarrow's errors for damaged pages (corrupt compression, ...)
            reason = " ".join(str(err).split())  # pyarrow's messages span lines
            raise KernelError(f"{source.name}: a damaged Parquet file ({type(err).__name__}: {reason}); download it "
                              "again, or leave it out of data.text_glob") from None
        if batch is None:
            return
        yield batch


RECORD_READERS = {"jsonl": jsonl_records, "json": json_records, "csv": csv_records, "tsv": csv_records,
                  "parquet": parquet_records}
TABULAR = {"csv", "tsv", "parquet"}  # their readers yield each row's text; the others yield whole records


def whole_records(source: Source) -> Iterator:
    """Every record whole (a CSV/TSV or Parquet row as a dict of its columns), for conversations, whose
    turns span several fields; INVALID_JSON for a JSON Lines line that does not parse."""
    with source.reading():
        if source.format in ("csv", "tsv"):
            csv.field_size_limit(2**31 - 1)
            with source.open_text() as f:
                reader = csv.DictReader(f, delimiter="\t" if source.format == "tsv" else ",")
                try:
                    yield from reader
                except csv.Error as err:
                    raise KernelError(f"{source.name}, line {reader.line_num}: not readable as "
                                      f"{source.format.upper()} ({err})") from None
        elif source.format == "parquet":
            for batch in parquet_batches(source, columns=None):
                yield from batch.to_pylist()
        else:
            yield from RECORD_READERS[source.format](source)


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
            raise KernelError(f"{source.name} has no column {' or '.join(map(repr, names))} (data.text_field); "
                              f"{listing}")
        return names[0]  # JSON: a record without the field is counted, not an error
    raise KernelError(f"{source.name}: no field named {' or '.join(map(repr, AUTO_TEXT_FIELDS))}; {listing}; set "
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
