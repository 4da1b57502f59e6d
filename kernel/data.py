"""## 5. Data

Find the text, build the tokenizer from its training part, turn both splits into token files on disk, and
serve random training windows from them. Built for corpora from one small .txt to many gigabytes:

* **Sources**: `data.text_glob` (`**` recurses), each file one document, in file-name order. Files are read
  as UTF-8 in blocks: a BOM is stripped, invalid bytes are replaced (and counted per file), binary files are
  skipped with a warning. With the glob empty the run uses the **demo corpus**: the help topics that ship
  inside every Python (`pydoc_data.topics`, ~465 KB of English), so the default run needs no download.
* **Split**: the last `data.val_fraction` of the characters is validation, the rest training: the two never
  overlap and the split is the same on every run. The tokenizer learns from the training part only.
* **Tokens**: documents are encoded in pieces of about a megabyte, in parallel worker processes, and
  appended to `train.bin` / `val.bin` (uint16 when the vocabulary fits, else uint32), with the
  end-of-document token after each document (a blank line for a tokenizer that has none, such as a `char`
  vocabulary saved before `char` had one). Memory stays flat as the corpus grows.
* **Cache**: the token files live in a folder named by a hash of the files (path, size, mtime), the split
  and the tokenizer settings; a second run with the same inputs reuses them. A build is written to a
  temporary folder and renamed when complete, so an interrupted build never looks complete.
* **Batches**: random windows of `block_size + 1` tokens from the memory-mapped files, drawn by a seeded
  `torch.Generator` whose state a checkpoint saves, so a resumed run draws exactly the batches it would have.
"""

import codecs
import collections
import contextlib
import errno
import glob
import hashlib
import json
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from kernel.env import KernelError, is_kaggle, kaggle_root, process_alive, write_atomic, write_error_advice
from kernel.config import Config
from kernel.tokenization import Tokenizer, document_separator, tokenizer_class, tokenizer_from_dict

DEMO_CORPUS = "demo corpus: Python's built-in help topics (pydoc_data.topics)"
READ_BLOCK_BYTES = 8 << 20       # bytes read from a file at a time
PIECE_CHARS = 1 << 20            # characters per encoding task
CACHE_FORMAT = 2                 # bump when the token files' layout changes (2: char's end-of-text token)


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


@dataclass
class Source:
    """One document: a text file, or one page of the demo corpus."""
    name: str
    path: Path | None = None
    text: str | None = None

    def signature(self) -> list:
        if self.path is None:
            return [self.name, len(self.text)]
        stat = self.path.stat()
        return [str(self.path), stat.st_size, stat.st_mtime_ns]

    def encoding(self) -> str:
        """UTF-8 unless a byte-order mark says UTF-16 or UTF-32 (as Windows tools often write)."""
        with open(self.path, "rb") as f:
            head = f.read(4)
        return next((name for bom, name in UNICODE_BOMS if head.startswith(bom)), "utf-8")

    def looks_binary(self) -> bool:
        if self.path is None or self.encoding() != "utf-8":  # UTF-16/32 text is full of NUL bytes
            return False
        with open(self.path, "rb") as f:
            return b"\x00" in f.read(8192)

    def blocks(self) -> Iterator[str]:
        """The text in blocks: decoded (UTF-8 or as its BOM says), BOM stripped, invalid bytes replaced by
        U+FFFD (and counted)."""
        if self.path is None:
            yield self.text
            return
        decoder = codecs.getincrementaldecoder(self.encoding())(errors="kernel_count_invalid")
        first = True
        with open(self.path, "rb") as f:
            while True:
                raw = f.read(READ_BLOCK_BYTES)
                text = decoder.decode(raw, final=not raw)
                if first:
                    text, first = text.removeprefix("\ufeff"), False
                if text:
                    yield text
                if not raw:
                    return


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


def kaggle_text_files() -> list[Path]:
    """The .txt files of the datasets (and competitions) attached to a Kaggle notebook, in both layouts:
    /kaggle/input/datasets/<owner>/<slug>/... (2026) and /kaggle/input/<slug>/... (older)."""
    root = kaggle_root() / "input"
    if not root.is_dir():
        return []
    found = []
    for top in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in KAGGLE_NOT_TEXT):
        found += glob.glob(str(top / "**" / "*.txt"), recursive=True)
    return unique_files(found)


def list_sources(text_glob: str) -> tuple[str, list[Source]]:
    """(a description, the documents), binary files left out with a warning. With no glob: on Kaggle the
    attached datasets' .txt files when there are any, else the demo corpus."""
    if not text_glob:
        attached = kaggle_text_files() if is_kaggle() else []
        if not attached:
            if is_kaggle():
                print(f"[data] no .txt file under {kaggle_root() / 'input'}: training on the demo corpus "
                      "(attach a dataset, or set DATA_GLOB)")
            return DEMO_CORPUS, demo_sources()
        print(f"[data] data.text_glob is empty: using the {len(attached)} .txt file(s) of the attached inputs")
        paths, description = attached, f"{len(attached)} .txt file(s) attached under {kaggle_root() / 'input'}"
    else:
        paths, description = find_text_files(text_glob), None
    sources = []
    for path in paths:
        source = Source(str(path), path=path)
        if source.looks_binary():
            print(f"[data] skipping {path}: it looks binary (NUL bytes), not text")
        else:
            sources.append(source)
    return description or f"{len(sources)} file(s) matching {text_glob!r}", sources


# --- The corpus as one stream of characters ------------------------------------------------------------

@dataclass
class Piece:
    split: str           # "train" or "val"
    text: str
    ends_document: bool  # an end-of-document separator follows


def measure(sources: list[Source]) -> tuple[list[int], dict]:
    """Characters per document (one streaming pass) and what was found: bytes, invalid bytes, empty files."""
    lengths, invalid, total_bytes = [], {}, 0
    for source in sources:
        INVALID_BYTE_COUNTS.append(0)
        lengths.append(sum(len(block) for block in source.blocks()))
        if count := INVALID_BYTE_COUNTS.pop():
            invalid[source.name] = count
            print(f"[data] {source.name}: {count} invalid UTF-8 byte sequence(s) replaced by U+FFFD")
        total_bytes += source.path.stat().st_size if source.path else len(source.text.encode("utf-8"))
    return lengths, {"bytes": total_bytes, "invalid_bytes": invalid}


def safe_cut(text: str, limit: int) -> int:
    """A cut point near `limit`: before a space that follows a non-space (where no BPE pre-token is split),
    else after a newline, else `limit` itself."""
    for position in range(limit, max(0, limit - 4096), -1):
        if text[position] == " " and not text[position - 1].isspace():
            return position
    newline = text.rfind("\n", 0, limit)
    return newline + 1 if newline > 0 else limit


def iterate_pieces(sources: list[Source], split_at: int, piece_chars: int | None = None) -> Iterator[Piece]:
    """The corpus as pieces of at most piece_chars characters; characters before `split_at` are training."""
    piece_chars = piece_chars or PIECE_CHARS
    offset = 0
    for source in sources:
        buffer = ""
        for block in source.blocks():
            buffer += block
            while len(buffer) > piece_chars or (offset < split_at < offset + len(buffer)):
                if offset < split_at < offset + len(buffer) and split_at - offset <= piece_chars:
                    cut = split_at - offset
                else:
                    cut = safe_cut(buffer, piece_chars)
                yield Piece("train" if offset < split_at else "val", buffer[:cut], False)
                buffer, offset = buffer[cut:], offset + cut
        if buffer:
            yield Piece("train" if offset < split_at else "val", buffer, True)
            offset += len(buffer)


def training_text_sample(sources: list[Source], split_at: int, max_chars: int, chunk_chars: int = 1 << 16):
    """The training text when it is small, else evenly spaced chunks adding up to about max_chars."""
    pieces = (p.text for p in iterate_pieces(sources, split_at) if p.split == "train")
    if split_at <= max_chars:
        yield from pieces
        return
    stride = split_at // max(1, max_chars // chunk_chars)
    offset, next_start = 0, 0
    for text in pieces:
        while next_start < offset + len(text):
            local = next_start - offset
            yield text[local : local + chunk_chars]
            next_start += stride
        offset += len(text)


@dataclass
class TrainingText:
    """The training split as a tokenizer learns from it (tokenization's TrainingCorpus), read on demand."""
    sources: list[Source]
    split_at: int

    def pieces(self) -> Iterator[str]:
        return (piece.text for piece in iterate_pieces(self.sources, self.split_at) if piece.split == "train")

    def sample(self, max_chars: int) -> Iterator[str]:
        return training_text_sample(self.sources, self.split_at, max_chars)


def train_tokenizer(config: Config, sources: list[Source], split_at: int) -> Tokenizer:
    settings = config.tokenizer
    return tokenizer_class(settings.mode, "in tokenizer.mode").build(settings, TrainingText(sources, split_at))


# --- Encoding in parallel, into token files ------------------------------------------------------------

def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 2**16 else np.uint32


WORKER_TOKENIZER: list = []  # set in each worker process (inherited through fork)


def encode_piece(text: str) -> np.ndarray:
    tokenizer = WORKER_TOKENIZER[0]
    if hasattr(tokenizer, "encode_array"):
        ids = tokenizer.encode_array(text)
    else:
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    return ids.astype(token_dtype(tokenizer.vocab_size))


def worker_count(requested: int) -> int:
    """0 means one worker per usable CPU. Workers need fork (Linux): a notebook's functions cannot be
    pickled into spawned processes."""
    if sys.platform != "linux":
        return 1
    available = len(os.sched_getaffinity(0))
    return max(1, min(requested or available, available))


def quiet_worker() -> None:
    """In a worker: die silently when the pool is terminated or the terminal sends Ctrl-C (the parent
    handles stops); a forked worker would otherwise run the parent's signal handlers and print tracebacks."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def ordered_map(function, items: Iterator, workers: int, window: int = 8) -> Iterator:
    """function(item) for each item, in order, with at most `window` pieces in flight (bounded memory)."""
    if workers <= 1:
        yield from map(function, items)
        return
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism; no Rust thread pools
    try:
        with multiprocessing.get_context("fork").Pool(workers, initializer=quiet_worker) as pool:
            pending: collections.deque = collections.deque()
            for item in items:
                pending.append(pool.apply_async(function, (item,)))
                if len(pending) >= window * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def write_token_files(sources: list[Source], split_at: int, tokenizer: Tokenizer, folder: Path,
                      workers: int) -> dict:
    """Encode every piece into folder/train.bin and folder/val.bin; returns token counts per split and the
    validation text's size in bytes."""
    dtype = token_dtype(tokenizer.vocab_size)
    if tokenizer.eos_id is not None:
        separator = np.array([tokenizer.eos_id], dtype=dtype)
    else:
        separator = np.asarray(tokenizer.encode(document_separator(tokenizer)), dtype=dtype)
    counts = {"train": 0, "val": 0, "val_bytes": 0}
    WORKER_TOKENIZER[:] = [tokenizer]
    in_flight: collections.deque = collections.deque()  # (split, ends_document) of the pieces being encoded

    def texts() -> Iterator[str]:
        for piece in iterate_pieces(sources, split_at):
            in_flight.append((piece.split, piece.ends_document))
            if piece.split == "val":  # bits per byte needs the validation text's size in bytes
                counts["val_bytes"] += len(piece.text.encode("utf-8"))
            yield piece.text

    with open(folder / "train.bin", "wb") as train_file, open(folder / "val.bin", "wb") as val_file:
        files = {"train": train_file, "val": val_file}
        for ids in ordered_map(encode_piece, texts(), workers):
            split, ends_document = in_flight.popleft()
            files[split].write(ids.tobytes())
            counts[split] += int(ids.size)
            if ends_document:
                files[split].write(separator.tobytes())
                counts[split] += int(separator.size)
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
    lengths, found = measure(sources)
    total_chars = sum(lengths)
    if total_chars == 0:
        raise KernelError(f"{source_description}: every file is empty")
    split_at = int(total_chars * (1 - config.data.val_fraction))
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        started = time.perf_counter()
        if tokenizer is None:
            tokenizer = train_tokenizer(config, sources, split_at)
        tokenizer_seconds, started = time.perf_counter() - started, time.perf_counter()
        counts = write_token_files(sources, split_at, tokenizer, staging, worker_count(config.data.workers))
        encode_seconds = time.perf_counter() - started
        stats = {"source": source_description, "documents": len(sources), "files": sum(s.path is not None for s in sources),
                 "bytes": found["bytes"], "chars": total_chars, "invalid_bytes": found["invalid_bytes"],
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
    description, sources = list_sources(config.data.text_glob)
    if not sources:
        raise KernelError(f"data.text_glob={config.data.text_glob!r}: every matching file is binary")
    folder = cache_root / f"tokens-{cache_key(sources, config, None)}"  # the same key before and after a resume
    if tokenizer is not None and not cached_with(folder, tokenizer):
        folder = cache_root / f"tokens-{cache_key(sources, config, tokenizer)}"
    cached = (folder / "meta.json").is_file()
    if not cached:
        remove_cache_debris(cache_root, None)
        build_cache(sources, config, tokenizer, folder, description)
    data = load_cached(folder)
    data.stats.update(seconds=round(time.perf_counter() - started, 2), cache=str(folder), cached=cached)
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
