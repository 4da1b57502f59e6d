"""# 4. Data

Find the text, build the tokenizer from its training part, turn both splits into token arrays, and serve
random training windows.

* With `data.text_glob` empty the run uses the **demo corpus**: the help topics that ship inside every
  Python installation (`pydoc_data.topics`, ~465 KB of English prose and code), so the default run needs
  no download and no dataset, on a laptop or on Kaggle.
* Each file is one document; documents are joined in file-name order, separated by the tokenizer's
  end-of-document token (a blank line for `char`).
* The validation split is the tail `data.val_fraction` of the text, so it never overlaps training text
  and is the same on every run.
* Batches are random windows of `block_size + 1` tokens drawn by a seeded `torch.Generator`, whose state a
  checkpoint saves so that a resumed run draws exactly the batches it would have drawn.
"""

import glob
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kernel.env import KernelError
from kernel.config import Config
from kernel.tokenization import END_OF_DOCUMENT, HFTokenizer, Tokenizer, build_tokenizer, document_separator

DEMO_CORPUS = "demo corpus: Python's built-in help topics (pydoc_data.topics)"


# --- Finding and reading text --------------------------------------------------------------------------

def demo_documents() -> list[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise KernelError("this Python has no pydoc_data module, which holds the demo corpus; "
                          "set data.text_glob to your own text files (e.g. data.text_glob='data/**/*.txt')") from None
    return [(f"pydoc_data.topics[{name!r}]", topics[name]) for name in sorted(topics)]


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
    fixed = [p for p in parts[: next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))]]
    return Path(*fixed) if fixed else Path(".")


def find_text_files(pattern: str) -> list[Path]:
    paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(p).is_file())
    if not paths:
        raise KernelError(f"data.text_glob={pattern!r} matches no file; {describe_folder(glob_root(pattern))}")
    return paths


def read_text_file(path: Path) -> str | None:
    """The file's text (UTF-8, BOM stripped, invalid bytes replaced), or None for a binary file."""
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        print(f"[data] skipping {path}: it looks binary (NUL bytes), not text")
        return None
    text = raw.decode("utf-8", errors="replace").removeprefix("\ufeff")
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode("utf-8"))
    if replaced:
        print(f"[data] {path}: {replaced} invalid UTF-8 byte sequence(s) replaced by U+FFFD")
    return text


def load_documents(text_glob: str) -> tuple[str, list[tuple[str, str]]]:
    """(description of the source, [(name, text), ...])."""
    if not text_glob:
        return DEMO_CORPUS, demo_documents()
    documents = [(str(p), text) for p in find_text_files(text_glob) if (text := read_text_file(p)) is not None]
    if not any(text.strip() for _, text in documents):
        raise KernelError(f"data.text_glob={text_glob!r}: every matching file is empty or binary")
    return f"{len(documents)} file(s) matching {text_glob!r}", documents


# --- Tokens --------------------------------------------------------------------------------------------

@dataclass
class TokenData:
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    stats: dict = field(default_factory=dict)

    @property
    def val_tokens_per_byte(self) -> float:
        return self.stats["val_tokens"] / max(1, self.stats["val_bytes"])


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def encode_to_array(tokenizer: Tokenizer, text: str, separator: str) -> np.ndarray:
    """Token ids of `text`; documents (split at `separator`) are encoded in parallel where the tokenizer can."""
    if hasattr(tokenizer, "encode_array"):
        ids = tokenizer.encode_array(text)
    elif hasattr(tokenizer, "encode_batch") and tokenizer.eos_id is not None:
        pieces = tokenizer.encode_batch(text.split(separator))
        ids = np.fromiter((i for n, piece in enumerate(pieces) for i in ([tokenizer.eos_id] if n else []) + piece),
                          dtype=np.int64)
    else:
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    return ids.astype(token_dtype(tokenizer.vocab_size))


def prepare_data(config: Config, tokenizer: Tokenizer | None = None) -> TokenData:
    """Read, split and tokenize. Pass the tokenizer of a checkpoint to resume with the same vocabulary."""
    started = time.perf_counter()
    source, documents = load_documents(config.data.text_glob)
    tok = config.tokenizer
    if tokenizer is None and tok.mode == "hf":  # loaded, not trained: needed first for its separator
        tokenizer = HFTokenizer.load(tok.pretrained_name)
    separator = document_separator(tokenizer) if tokenizer else ("\n\n" if tok.mode == "char" else END_OF_DOCUMENT)
    text = separator.join(text for _, text in documents)
    split_at = int(len(text) * (1 - config.data.val_fraction))
    train_text, val_text = text[:split_at], text[split_at:]
    if tokenizer is None:
        tokenizer = build_tokenizer(tok.mode, train_text, tok.vocab_size, tok.train_sample_mb, tok.pretrained_name)
    data = TokenData(tokenizer, encode_to_array(tokenizer, train_text, separator),
                     encode_to_array(tokenizer, val_text, separator))
    data.stats = {
        "source": source, "documents": len(documents), "bytes": len(text.encode("utf-8")),
        "train_tokens": int(data.train.size), "val_tokens": int(data.val.size),
        "val_bytes": len(val_text.encode("utf-8")), "vocab_size": tokenizer.vocab_size,
        "seconds": round(time.perf_counter() - started, 2),
    }
    check_split_lengths(data, config.model.block_size)
    return data


def check_split_lengths(data: TokenData, block_size: int) -> None:
    for split, tokens in (("train", data.train), ("validation", data.val)):
        if tokens.size < block_size + 2:
            raise KernelError(
                f"the {split} split has {tokens.size} tokens, fewer than one window of model.block_size+1 = "
                f"{block_size + 1}; add text, lower model.block_size, or change data.val_fraction")


def print_data_report(data: TokenData) -> None:
    s = data.stats
    print(f"[data] {s['source']}: {s['documents']} documents, {s['bytes']:,} bytes, vocab {s['vocab_size']}")
    print(f"[data] tokens: train {s['train_tokens']:,} | val {s['val_tokens']:,} | "
          f"{data.val_tokens_per_byte:.3f} tokens/byte | {s['seconds']:.1f}s")


# --- Batches -------------------------------------------------------------------------------------------

class BatchSampler:
    """Random windows from one split; its state (the generator's) is saved in checkpoints."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, block_size) int64; targets are inputs shifted by one."""
        starts = torch.randint(self.tokens.size - self.block_size, (self.batch_size,), generator=self.generator)
        windows = np.stack([self.tokens[s : s + self.block_size + 1] for s in starts.tolist()])
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
