"""# 3. Tokenization

Text in, integer ids out, and back. Every tokenizer offers the same small interface, so the data pipeline,
the trainer and the sampler never ask which kind they hold:

    encode(text) -> list[int]    decode(ids) -> str    vocab_size    save(folder)    load(folder)

`char` gives every distinct character of the training text its own id (in code-point order, so the same
text always yields the same vocabulary). Id 0 is reserved for characters never seen in training: they
encode to it and it decodes to U+FFFD, so unseen text never crashes the model.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np

from kernel.env import KernelError


class Tokenizer(Protocol):
    mode: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids) -> str: ...
    def save(self, folder: str | Path) -> None: ...
    def to_dict(self) -> dict: ...


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- char ----------------------------------------------------------------------------------------------

class CharTokenizer:
    mode = "char"
    UNKNOWN = "\ufffd"  # what id 0 decodes to
    FILE_NAME = "char_vocab.json"

    def __init__(self, chars: list[str]):
        self.chars = [self.UNKNOWN] + [c for c in chars if c != self.UNKNOWN]
        self.vocab_size = len(self.chars)
        # Sorted code points let numpy map a whole text at once (searchsorted), not one dict lookup per char.
        self._code_points = np.array([ord(c) for c in self.chars[1:]], dtype=np.int64)
        self._order = np.argsort(self._code_points)
        self._sorted_code_points = self._code_points[self._order]

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        if not text:
            raise KernelError("cannot build a char vocabulary from empty text")
        return cls(sorted(set(text)))

    def encode_array(self, text: str) -> np.ndarray:
        code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        if self._sorted_code_points.size == 0:
            return np.zeros(code_points.size, dtype=np.int64)
        slots = np.searchsorted(self._sorted_code_points, code_points).clip(max=self._sorted_code_points.size - 1)
        known = self._sorted_code_points[slots] == code_points
        return np.where(known, self._order[slots] + 1, 0)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        return "".join(self.chars[i] if 0 <= i < self.vocab_size else self.UNKNOWN for i in map(int, ids))

    def to_dict(self) -> dict:
        return {"mode": self.mode, "chars": self.chars[1:]}

    def save(self, folder: str | Path) -> None:
        write_text_atomic(Path(folder) / self.FILE_NAME, json.dumps(self.to_dict(), ensure_ascii=False, indent=0))


# --- Choosing, restoring -------------------------------------------------------------------------------

def tokenizer_from_dict(state: dict) -> Tokenizer:
    """Rebuild a tokenizer from what to_dict() returned (stored in every checkpoint)."""
    if state.get("mode") == "char":
        return CharTokenizer(list(state["chars"]))
    raise KernelError(f"unknown tokenizer mode {state.get('mode')!r} in saved tokenizer state")


def load_tokenizer(folder: str | Path) -> Tokenizer:
    path = Path(folder) / CharTokenizer.FILE_NAME
    if not path.is_file():
        raise KernelError(f"no saved tokenizer in {folder} (expected {CharTokenizer.FILE_NAME})")
    try:
        return tokenizer_from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise KernelError(f"{path} is not a valid saved tokenizer: {err}") from None


def build_tokenizer(mode: str, training_text: str) -> Tokenizer:
    if mode == "char":
        return CharTokenizer.train(training_text)
    raise KernelError(f"tokenizer.mode={mode!r} is not supported; use 'char'")
