"""## 9. Tokens and batches

The documents of sections 6 and 7 become token files on disk, and random training windows are served from them.
Built for corpora from one small .txt to many gigabytes:

* **Split**: the last `data.val_fraction` of the characters is validation, the rest training: the two never
  overlap and the split is the same on every run. A tokenizer trained here (`char`, `bpe_simple`) learns
  from the training part only.
* **Tokens**: documents are encoded in pieces of about a megabyte, in parallel worker processes on Linux
  (`data.workers`), and appended to `train.bin` / `val.bin` (uint16 when the vocabulary fits, else uint32),
  with the end-of-document token after each document (a blank line for a tokenizer that has none), and
  before each one the beginning-of-sequence token of a tokenizer that adds one itself (Llama's `<s>`: a
  pretrained model saw it there). Memory stays flat as the corpus grows.
* **Cache**: the token files live in a folder named by a hash of the files (path, size, mtime), the text
  field, the split and the tokenizer settings; a second run with the same inputs reuses them. It is under
  the output folder, except on Kaggle, where the output folder is kept with every version: there it is in
  the session's temporary space (`data.cache_dir` chooses another place). A build is written to a
  temporary folder and renamed when complete, so an interrupted build never looks complete.
* **Batches**: random windows of `block_size + 1` tokens from the memory-mapped files, drawn by a seeded
  `torch.Generator` whose state a checkpoint saves, so a resumed run draws exactly the batches it would have.
"""

import collections
import contextlib
import errno
import hashlib
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
from typing import Iterator

import numpy as np
import torch

from kernel.env import CACHE_DIR, KernelError, is_kaggle, process_alive, write_atomic, write_error_advice
from kernel.config import Config
from kernel.tokenization import Tokenizer, document_separator, tokenizer_class, tokenizer_from_dict
from kernel.sources import INVALID_BYTE_COUNTS, Source
from kernel.inputs import list_sources
from kernel.chat import ConversationSampler, Rows, chat_files, encode_corpus

PIECE_CHARS = 1 << 20            # characters per encoding task
KAGGLE_CACHE_FOLDER = "train-gpt-token-cache"  # under the temporary folder (/tmp) on Kaggle
MAX_LISTED_SKIPS = 100           # skipped files named in summary.json (all are counted)
CACHE_FORMAT = 3                 # bump when the token files' layout changes (2: char's end-of-text token,
                                 # 3: a tokenizer's own beginning-of-sequence token before each document)


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
            raise KernelError(f"{source.name}: no record has text ({dict(skipped) or 'no records'}); check "
                              f"data.text_field (now {source.text_field or 'automatic'!r})")
        skipped_records.update(skipped)
        per_format = found["formats"].setdefault(source.format if source.path else "demo", {"files": 0, "documents": 0})
        per_format["files"] += source.path is not None
        per_format["documents"] += documents
        found["documents"] += documents
        found["bytes"] += source.size() if source.path else len(source.text.encode("utf-8"))
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
    if any(source.format != "text" for source in sources):  # records may hold conversations (section 8)
        description["chat"] = [config.data.format, config.train.loss_on, config.model.block_size]
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class TokenData:
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    stats: dict = field(default_factory=dict)
    rows: dict[str, Rows] | None = None  # conversations (section 8): each split as rows, not one stream

    @property
    def val_tokens_per_byte(self) -> float:
        return self.stats["val_tokens"] / max(1, self.stats["val_bytes"])

    @property
    def chat(self) -> bool:
        return self.rows is not None

    def sampler(self, split: str, block_size: int, batch_size: int, seed: int):
        """Batches of one split: random windows of the token stream, or (conversations) random rows."""
        if self.rows is None:
            return BatchSampler(self.train if split == "train" else self.val, block_size, batch_size, seed)
        rows = self.rows[split]
        pad = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0
        return ConversationSampler(rows.ids, rows.mask, rows.offsets, batch_size, seed, pad)


ROW_ARRAYS = ("ids", "mask", "offsets")  # a conversation cache's files per split: {split}.{array}.npy


def write_rows(splits: dict[str, Rows], folder: Path) -> None:
    for split, rows in splits.items():
        for name in ROW_ARRAYS:
            np.save(folder / f"{split}.{name}.npy", getattr(rows, name))


def load_rows(folder: Path) -> dict[str, Rows]:
    return {split: Rows(*(np.load(folder / f"{split}.{name}.npy", mmap_mode="r") for name in ROW_ARRAYS))
            for split in ("train", "val")}


def load_cached(folder: Path) -> TokenData:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    tokenizer = tokenizer_from_dict(meta["tokenizer"])
    if meta["stats"].get("format") == "chat":
        rows = load_rows(folder)
        return TokenData(tokenizer, rows["train"].ids, rows["val"].ids, meta["stats"], rows)
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
        if chat := chat_files(sources, config.data.format):
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            tokenizer, splits, stats = encode_corpus(sources, chat, config, tokenizer)
            write_rows(splits, staging)
            stats.update(source=source_description, files=sum(s.path is not None for s in sources))
            write_atomic(staging / "meta.json", json.dumps({"stats": stats, "tokenizer": tokenizer.to_dict()}))
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(staging, folder)
            return
        found = measure(sources)
        if found["chars"] == 0:
            raise KernelError(f"{source_description}: every file is empty")
        split_at = int(found["chars"] * (1 - config.data.val_fraction))
        if split_at == 0 or split_at == found["chars"]:
            raise KernelError(f"{source_description}: {found['chars']:,} character(s) in all, too short a corpus to "
                              "hold both training and validation text "
                              f"(data.val_fraction={config.data.val_fraction:g}); add text: a few thousand characters "
                              "at the very least")
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
    return out_dir / CACHE_DIR, True


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
    if data.chat:  # rows of any length: encode_corpus made sure each split has some
        return
    for split, tokens in (("train", data.train), ("validation", data.val)):
        if tokens.size < block_size + 2:
            raise KernelError(
                f"the {split} split has {tokens.size} tokens, fewer than one window of model.block_size+1 = "
                f"{block_size + 1}; add text, lower model.block_size, or change data.val_fraction")


def print_data_report(data: TokenData) -> None:
    s = data.stats
    if data.chat:
        print(f"[data] {s['source']}: {s['conversations']:,} conversations, {s['documents']:,} text documents, "
              f"{s['truncated']:,} cut at model.block_size, vocab {s['vocab_size']:,}, {s['chat_template']} chat "
              f"template")
        print(f"[data] tokens: train {s['train_tokens']:,} ({s['trained_tokens']['train']:,} trained on: "
              f"train.loss_on={s['loss_on']}) | val {s['val_tokens']:,} | {'cached' if s['cached'] else 'built'} "
              f"in {s['seconds']:.1f}s ({s['cache']})")
        return
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
