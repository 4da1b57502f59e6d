"""## 3. Tokenization

Text in, integer ids out, and back. Every tokenizer offers the same small interface, so the data pipeline,
the trainer and the sampler never ask which kind they hold:

    encode(text) -> list[int]    decode(ids) -> str    vocab_size    eos_id    bos_id    save(folder)    to_dict()

* `char`: every distinct character of the training text gets its own id, in code-point order, so the same
  text always yields the same vocabulary. Id 0 stands for characters never seen in training: they encode
  to it and it decodes to U+FFFD, so unseen text never crashes the model. The last id is `<|endoftext|>`,
  put between documents, so generation learns where a text ends.
* `bpe_simple`: byte-level BPE (GPT-2's scheme: any text, any language, no unknown tokens) trained
  offline on the training text with the `tokenizers` library, on an evenly spread sample of at most
  `tokenizer.train_sample_mb` so memory stays bounded, with `<|endoftext|>` between documents.
* `hf`: an existing tokenizer through `transformers.AutoTokenizer`, from a local folder (offline, e.g. a
  Kaggle dataset) or a Hub id (needs internet). Remote code is never trusted. A tokenizer that puts a
  beginning-of-sequence token before every text (Llama's `<s>`) reports it as `bos_id`.

`save(folder)` writes the files that `AutoTokenizer.from_pretrained(folder)` loads offline and that encode
to the same ids (a `tokenizer.json` for `char` and `bpe_simple`), plus `kernel_tokenizer.json`, which this
program reads back.

`TOKENIZERS` maps each mode to its class. Each class also builds itself from the config's `tokenizer`
settings and the training text, names the settings that identify it (part of the token cache key) and
those that cannot work (reported when the config is checked), and restores itself from `to_dict()` or a
saved folder.
"""

import array
import copy
import json
import os
import re
import socket
import tempfile
import urllib.parse
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as FastBackend

from kernel.env import KernelError, attached_folders, write_atomic

END_OF_DOCUMENT = "<|endoftext|>"
STATE_FILE = "kernel_tokenizer.json"
# Conversations (section 8) in a tokenizer without a chat template of its own: ChatML's turn markers, added
# to the vocabulary as special tokens, and this template (what transformers' apply_chat_template renders).
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
BUILT_IN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class Tokenizer(Protocol):
    mode: str
    vocab_size: int
    eos_id: int | None  # the end-of-document token, when the tokenizer has one
    bos_id: int | None  # a token the tokenizer itself puts before every text (Llama's <s>), else None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids) -> str: ...
    def save(self, folder: str | Path) -> None: ...
    def to_dict(self) -> dict: ...
    def state_fingerprint(self) -> dict: ...


class TokenizerSettings(Protocol):
    """The config's `tokenizer` section (TokenizerConfig; the config section comes after this one)."""
    mode: str
    vocab_size: int
    train_sample_mb: int
    pretrained_name: str


class TrainingCorpus(Protocol):
    """The training split, as the data section hands it to a tokenizer to learn from."""
    def pieces(self) -> Iterator[str]: ...                # all of it, in order
    def sample(self, max_chars: int) -> Iterator[str]: ...  # at most ~max_chars, evenly spread


class RegisteredTokenizer:
    """What a mode in TOKENIZERS offers besides the Tokenizer interface. Config checks, the data pipeline
    and restoring all go through these, so a new mode is a new subclass here and one entry in TOKENIZERS."""
    mode: str
    bos_id: int | None = None
    chat_template: str | None = None  # a Jinja chat template (transformers' format) once it reads conversations
    hf_tokenizer = None               # for_transformers()'s tokenizer, once built

    def with_chat(self) -> "RegisteredTokenizer":
        """This tokenizer ready for conversations: its own chat template, or the built-in one with its turn
        markers added to the vocabulary (new ids after the others)."""
        raise NotImplementedError

    def for_transformers(self):
        """The same tokenizer as a transformers tokenizer (its chat template included): what `save` writes
        and what conversations are rendered and encoded with."""
        raise NotImplementedError

    @classmethod
    def build(cls, settings: TokenizerSettings, corpus: TrainingCorpus) -> "RegisteredTokenizer":
        """The tokenizer a run with these settings uses, learnt from the training text where it learns."""
        raise NotImplementedError

    @classmethod
    def fingerprint(cls, settings: TokenizerSettings) -> dict:
        """The settings that decide what build() returns: part of the token cache key."""
        return {"mode": cls.mode}

    @classmethod
    def config_problems(cls, settings: TokenizerSettings) -> list[str]:
        """Settings this mode cannot work with, reported by config validation before anything runs."""
        return []

    @classmethod
    def from_dict(cls, state: dict) -> "RegisteredTokenizer":
        """The tokenizer back from to_dict() (stored in every checkpoint and token cache)."""
        raise NotImplementedError

    @classmethod
    def load(cls, folder: str | Path) -> "RegisteredTokenizer":
        """The tokenizer back from save(folder)."""
        raise NotImplementedError

    def state_fingerprint(self) -> dict:
        """What identifies this exact vocabulary: hashed into the cache key when a checkpoint's is reused."""
        return self.to_dict()

    @classmethod
    def current_state(cls, settings: TokenizerSettings) -> dict | None:
        """For tokenizers that live outside the run (a folder, a Hub id): to_dict() of what those settings
        name now, to notice on resume that it changed. None for tokenizers the run trains itself."""
        return None


def read_state(folder: str | Path) -> dict:
    return json.loads((Path(folder) / STATE_FILE).read_text(encoding="utf-8"))


def fast_tokenizer(backend: FastBackend, chat_template: str | None, **special_tokens):
    from transformers import PreTrainedTokenizerFast  # imported late: transformers is slow to import

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)
    tokenizer.chat_template = chat_template
    return tokenizer


def save_for_transformers(folder: str | Path, tokenizer, state: dict) -> None:
    """tokenizer.json + tokenizer_config.json (+ the chat template) for AutoTokenizer, and our own state file."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory(dir=folder.parent if folder.parent.exists() else None) as staging:
        tokenizer.save_pretrained(staging)
        for name in sorted(os.listdir(staging)):
            write_atomic(folder / name, Path(staging, name).read_text(encoding="utf-8"))
    write_atomic(folder / STATE_FILE, json.dumps(state, ensure_ascii=False))


# --- char ----------------------------------------------------------------------------------------------

class CharTokenizer(RegisteredTokenizer):
    mode = "char"
    UNKNOWN = "\ufffd"  # what id 0 decodes to

    def __init__(self, chars: list[str], end_of_text: bool = True, chat_template: str | None = None):
        self.chars = [self.UNKNOWN] + [c for c in chars if c != self.UNKNOWN]
        # The end-of-text token comes after the characters. Vocabularies saved before it existed have none
        # (their runs separated documents by a blank line) and load without it, so their models still fit.
        self.eos_id = len(self.chars) if end_of_text else None
        # With conversations, the chat template's turn markers come after it.
        self.chat_template = chat_template
        self.special = ([END_OF_DOCUMENT] if end_of_text else []) + (list(CHAT_TOKENS) if chat_template else [])
        self.vocab_size = len(self.chars) + len(self.special)
        # Sorted code points let numpy map a whole text at once (searchsorted), not one dict lookup per char.
        self._code_points = np.array([ord(c) for c in self.chars[1:]], dtype=np.int64)
        self._order = np.argsort(self._code_points)
        self._sorted_code_points = self._code_points[self._order]

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        if not text:
            raise KernelError("cannot build a char vocabulary from empty text")
        return cls(sorted(set(text)))

    @classmethod
    def build(cls, settings: TokenizerSettings, corpus: TrainingCorpus) -> "CharTokenizer":
        chars: set[str] = set()  # piece by piece: the whole training text never sits in memory at once
        for text in corpus.pieces():
            chars.update(text)
        return cls.train("".join(sorted(chars)))

    @classmethod
    def from_dict(cls, state: dict) -> "CharTokenizer":
        return cls(list(state["chars"]), end_of_text=bool(state.get("end_of_text", False)),
                   chat_template=state.get("chat_template"))

    def with_chat(self) -> "CharTokenizer":
        return self if self.chat_template else CharTokenizer(self.chars[1:], True, BUILT_IN_CHAT_TEMPLATE)

    @classmethod
    def load(cls, folder: str | Path) -> "CharTokenizer":
        return cls.from_dict(read_state(folder))  # the state file holds the whole vocabulary

    def encode_array(self, text: str) -> np.ndarray:
        code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        if self._sorted_code_points.size == 0:
            return np.zeros(code_points.size, dtype=np.int64)
        slots = np.searchsorted(self._sorted_code_points, code_points).clip(max=self._sorted_code_points.size - 1)
        known = self._sorted_code_points[slots] == code_points
        return np.where(known, self._order[slots] + 1, 0)

    def encode(self, text: str) -> list[int]:
        """The ids of the text; a literal `<|endoftext|>` (or a chat turn marker) in it is that special token
        (as in bpe_simple and in the saved tokenizer.json). encode_array, for the corpus, reads every character
        as a character."""
        if not any(token in text for token in self.special):
            return self.encode_array(text).tolist()
        ids: list[int] = []
        for part in re.split(f"({'|'.join(map(re.escape, self.special))})", text):
            ids += [len(self.chars) + self.special.index(part)] if part in self.special else self.encode_array(part).tolist()
        return ids

    def decode(self, ids) -> str:
        names = self.chars + self.special
        return "".join(names[i] if 0 <= i < self.vocab_size else self.UNKNOWN for i in map(int, ids))

    def to_dict(self) -> dict:
        state = {"mode": self.mode, "chars": self.chars[1:], "end_of_text": self.eos_id is not None}
        return state | ({"chat_template": self.chat_template} if self.chat_template else {})

    def backend(self) -> FastBackend:
        """The same vocabulary as a `tokenizers` word-level model that splits text into single characters."""
        vocabulary = {c: i for i, c in enumerate(self.chars + self.special)}
        backend = FastBackend(models.WordLevel(vocabulary, unk_token=self.UNKNOWN))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        # matched whole before the text is split into characters
        backend.add_special_tokens([AddedToken(token, special=True) for token in self.special])
        return backend

    def for_transformers(self):
        if self.hf_tokenizer is None:  # built once: a tokenizer never changes (with_chat makes a new one)
            special = {"bos_token": END_OF_DOCUMENT, "eos_token": END_OF_DOCUMENT} if self.eos_id is not None else {}
            self.hf_tokenizer = fast_tokenizer(self.backend(), self.chat_template, unk_token=self.UNKNOWN, **special)
        return self.hf_tokenizer

    def save(self, folder: str | Path) -> None:
        save_for_transformers(folder, self.for_transformers(), self.to_dict())


# --- bpe_simple ----------------------------------------------------------------------------------------

class BPETokenizer(RegisteredTokenizer):
    """Byte-level BPE. Encoding large corpora goes through a cache of text segments (see encode_array)."""

    mode = "bpe_simple"
    # Where GPT-2's pre-tokenizer always cuts, the text can be cut and the pieces ("segments") encoded
    # separately with the same ids: before a space that follows a non-space or precedes a non-space, and
    # before a line break that follows a non-space. A segment, once encoded, is looked up afterwards, several
    # times faster than encoding everything in Rust. Python's \S is narrower than the Rust regex's, so every
    # cut made here is also a cut there (tests compare with the Rust tokenizer on real and adversarial text).
    # The general segmenter: an optional leading space, then characters up to the next cut (inside, a space
    # appears only between whitespace on both sides, where the regex does not cut).
    SEGMENT = re.compile(r" ?(?:[^ ]+|(?<=\s) (?!\S))+| ")
    CACHE_LIMIT = 1_000_000  # segments per cache (~150 MB); cleared when full, so memory stays bounded
    BLOCK_CHARS = 1 << 16    # irregular text is retried in blocks of this size for the fast path

    def __init__(self, backend: FastBackend, chat_template: str | None = None):
        self.backend, self.chat_template = backend, chat_template
        self.vocab_size = backend.get_vocab_size()
        self.eos_id = backend.token_to_id(END_OF_DOCUMENT)
        self._segment_ids: dict[str, bytes] = {}  # segment -> its ids as uint32 bytes
        self._word_ids: dict[str, bytes] = {}     # fast path: "word" -> ids of " word" ("\nword" -> its own)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        backend = FastBackend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_DOCUMENT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(texts, trainer)
        if backend.get_vocab_size() < vocab_size:
            raise KernelError(f"tokenizer.vocab_size={vocab_size} is more than this corpus supports: BPE found only "
                              f"{backend.get_vocab_size()} tokens; lower tokenizer.vocab_size or add text")
        return cls(backend)

    @classmethod
    def build(cls, settings: TokenizerSettings, corpus: TrainingCorpus) -> "BPETokenizer":
        # the trainer holds what it reads, so it reads a bounded sample
        return cls.train(corpus.sample(settings.train_sample_mb << 20), settings.vocab_size)

    @classmethod
    def fingerprint(cls, settings: TokenizerSettings) -> dict:
        return {"mode": cls.mode, "vocab_size": settings.vocab_size, "train_sample_mb": settings.train_sample_mb}

    @classmethod
    def config_problems(cls, settings: TokenizerSettings) -> list[str]:
        if settings.vocab_size >= 257:
            return []
        return [f"'tokenizer.vocab_size' must be >= 257 for bpe_simple (256 bytes + end-of-document), "
                f"got {settings.vocab_size}"]

    @classmethod
    def from_dict(cls, state: dict) -> "BPETokenizer":
        return cls(FastBackend.from_str(state["tokenizer_json"]), state.get("chat_template"))

    @classmethod
    def load(cls, folder: str | Path) -> "BPETokenizer":
        # its state file holds the mode and the chat template; tokenizer.json the rest
        return cls(FastBackend.from_file(str(Path(folder) / "tokenizer.json")), read_state(folder).get("chat_template"))

    def with_chat(self) -> "BPETokenizer":
        if self.chat_template:
            return self
        backend = FastBackend.from_str(self.backend.to_str())
        backend.add_special_tokens([AddedToken(token, special=True) for token in CHAT_TOKENS])
        return BPETokenizer(backend, BUILT_IN_CHAT_TEMPLATE)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def encode_array(self, text: str) -> np.ndarray:
        """Same ids as encode(text), through the segment caches (for text without special tokens)."""
        if self._fast_path_applies(text):
            data = self._encode_fast(text)
        elif len(text) > 2 * self.BLOCK_CHARS:
            data = b"".join(self._encode_fast(block) if self._fast_path_applies(block) else self._encode_general(block)
                            for block in split_at_cuts(text, self.BLOCK_CHARS))
        else:
            data = self._encode_general(text)
        return np.frombuffer(data, dtype=np.uint32)

    @staticmethod
    def _fast_path_applies(text: str) -> bool:
        """True when every space and every line break after a non-space is a cut, and no longer whitespace
        run changes how its last characters group ("\n\n\n", "\r\n", trailing whitespace)."""
        return (bool(text) and not text[-1].isspace() and "\r" not in text and "\n\n\n" not in text
                and SPACE_AFTER_WHITESPACE.search(text) is None)

    def _encode_fast(self, text: str) -> bytes:
        """str.split instead of a regex: a space is put before each line break so that one split finds every
        cut; each part after the first stands for " part" (or itself, when it starts with the line break)."""
        parts = text.replace("\n", " \n").split(" ")
        head = self._lookup(self._segment_ids, parts[:1], lambda part: part)
        return head + self._lookup(self._word_ids, parts[1:], lambda part: part if part[:1] == "\n" else " " + part)

    def _encode_general(self, text: str) -> bytes:
        return self._lookup(self._segment_ids, self.SEGMENT.findall(text), lambda segment: segment)

    def _lookup(self, cache: dict[str, bytes], keys: list[str], segment_of) -> bytes:
        """The ids of every key's segment, concatenated; segments not cached yet are encoded in one batch."""
        missing = set(keys).difference(cache)
        if len(cache) + len(missing) > self.CACHE_LIMIT:
            cache.clear()
            missing = set(keys)
        if missing:
            missing_keys = sorted(missing)
            encode_batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            encoded = encode_batch([segment_of(key) for key in missing_keys])
            cache.update(zip(missing_keys, (array.array("I", e.ids).tobytes() for e in encoded)))
        return b"".join(map(cache.__getitem__, keys))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts)]  # parallel across cores in Rust

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_dict(self) -> dict:
        state = {"mode": self.mode, "tokenizer_json": self.backend.to_str()}
        return state | ({"chat_template": self.chat_template} if self.chat_template else {})

    def for_transformers(self):
        if self.hf_tokenizer is None:  # built once: a tokenizer never changes (with_chat makes a new one)
            self.hf_tokenizer = fast_tokenizer(self.backend, self.chat_template, bos_token=END_OF_DOCUMENT,
                                               eos_token=END_OF_DOCUMENT)
        return self.hf_tokenizer

    def save(self, folder: str | Path) -> None:
        state = {"mode": self.mode} | ({"chat_template": self.chat_template} if self.chat_template else {})
        save_for_transformers(folder, self.for_transformers(), state)


# A space right after whitespace (a space included) may not be a cut: texts with one take the regex path.
SPACE_AFTER_WHITESPACE = re.compile(r"\s ")


def split_at_cuts(text: str, block_chars: int) -> list[str]:
    """The text in blocks of about block_chars, cut only before a space that follows a non-space (a cut for
    GPT-2's pre-tokenizer, so blocks encode independently)."""
    blocks, start = [], 0
    while len(text) - start > block_chars:
        cut = text.find(" ", start + block_chars)
        while cut != -1 and text[cut - 1].isspace():
            cut = text.find(" ", cut + 1)
        if cut == -1:
            break
        blocks.append(text[start:cut])
        start = cut
    blocks.append(text[start:])
    return blocks


# --- hf ------------------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def added_bos(hf_tokenizer) -> int | None:
    """The beginning-of-sequence token a tokenizer puts before every text it encodes with special tokens
    (Llama, Mistral, Gemma), so its models were pretrained with it before each document; None for those
    that add nothing (GPT-2, Qwen) or use the end-of-text token for both (the separator already does it)."""
    bos, text = hf_tokenizer.bos_token_id, "a"
    plain = hf_tokenizer.encode(text, add_special_tokens=False)
    full = hf_tokenizer.encode(text, add_special_tokens=True)
    if bos is None or bos == hf_tokenizer.eos_token_id or full[:1] != [bos] or full[1:1 + len(plain)] != plain:
        return None
    return bos


def holds_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def attached_tokenizer(name: str) -> str:
    """A name that is no folder here, on Kaggle: the attached tokenizer (or model) folder whose path holds it
    ("qwen-3", "mytok"); several are one error naming them. Otherwise the name as it is (a Hub id)."""
    if Path(name).is_dir():
        return name
    found = attached_folders(name, holds_tokenizer)
    if len(found) > 1:
        listed = "\n  - ".join(map(str, found))
        raise KernelError(f"tokenizer.pretrained_name={name!r}: {len(found)} attached folders match; set it to one "
                          f"of them:\n  - {listed}")
    return str(found[0]) if found else name


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached (one quick connection), or None. Asked before a download, so
    that offline (Kaggle with internet off) a Hub name fails at once instead of after a minute of retries."""
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    try:
        socket.create_connection((host, endpoint.port or 443), timeout=timeout).close()
    except OSError as err:
        return f"{host} cannot be reached ({err.strerror or err})"
    return None


def cached_or_downloaded(auto_class, name: str):
    """`auto_class.from_pretrained(name)`: a folder, or a Hub id from the local cache, else downloaded when the
    Hub can be reached."""
    if Path(name).is_dir():
        return auto_class.from_pretrained(name, trust_remote_code=False)
    try:
        return auto_class.from_pretrained(name, trust_remote_code=False, local_files_only=True)
    except OSError:
        if reason := hub_unreachable():
            raise OSError(f"not in the local cache, and {reason}") from None
        return auto_class.from_pretrained(name, trust_remote_code=False)


class HFTokenizer(RegisteredTokenizer):
    mode = "hf"

    def __init__(self, hf_tokenizer, name: str, chat: bool = False):
        self.hf, self.name = hf_tokenizer, name
        # Its own template (in tokenizer_config.json) is only part of its state once it reads conversations,
        # so checkpoints of plain-text runs compare equal to the folder whatever templates it holds.
        template = hf_tokenizer.chat_template if isinstance(hf_tokenizer.chat_template, str) else None
        self.chat_template = template if chat else None
        self.vocab_size = len(hf_tokenizer)
        self.eos_id = hf_tokenizer.eos_token_id
        self.bos_id = added_bos(hf_tokenizer)

    @classmethod
    def build(cls, settings: TokenizerSettings, corpus: TrainingCorpus) -> "HFTokenizer":
        return cls.load(settings.pretrained_name)  # already trained: the corpus is not needed

    @classmethod
    def fingerprint(cls, settings: TokenizerSettings) -> dict:
        return {"mode": cls.mode, "pretrained_name": settings.pretrained_name}

    @classmethod
    def config_problems(cls, settings: TokenizerSettings) -> list[str]:
        if settings.pretrained_name:
            return []
        return ["'tokenizer.pretrained_name' must name a tokenizer folder or Hub id when tokenizer.mode is hf"]

    @classmethod
    def from_dict(cls, state: dict) -> "HFTokenizer":
        if "tokenizer_json" not in state:  # saved before tokenizers were carried whole: only the name
            return cls.load(state["name"])
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=FastBackend.from_str(state["tokenizer_json"]),
                                     clean_up_tokenization_spaces=state["clean_up_tokenization_spaces"],
                                     **state["special_tokens"])
        hf.chat_template = state.get("chat_template")
        return cls(hf, state["name"], chat="chat_template" in state)

    def with_chat(self) -> "HFTokenizer":
        """Its own chat template (Qwen3's, Llama 3's...), or the built-in one and its markers added."""
        if self.chat_template:
            return self
        if isinstance(self.hf.chat_template, str):
            return HFTokenizer(self.hf, self.name, chat=True)
        hf = copy.deepcopy(self.hf)
        hf.add_tokens([AddedToken(token, special=True) for token in CHAT_TOKENS], special_tokens=True)
        hf.chat_template = BUILT_IN_CHAT_TEMPLATE
        return HFTokenizer(hf, self.name, chat=True)

    def for_transformers(self):
        return self.hf

    @classmethod
    def current_state(cls, settings: TokenizerSettings) -> dict | None:
        try:
            return cls.load(settings.pretrained_name).to_dict()
        except KernelError:  # gone or offline: the checkpoint's own copy is used
            return None

    @classmethod
    def load(cls, name: str | Path) -> "HFTokenizer":
        """From a folder (one that save() wrote, or any tokenizer folder) or a Hub id."""
        from transformers import AutoTokenizer

        name = str(name)
        if not name:
            raise KernelError("tokenizer.mode=hf needs tokenizer.pretrained_name: a local tokenizer folder "
                              "(e.g. an attached Kaggle dataset) or a Hugging Face Hub id")
        name = attached_tokenizer(name)
        try:
            if Path(name).is_dir() and not holds_tokenizer(Path(name)):
                raise OSError(f"no tokenizer file ({', '.join(TOKENIZER_FILES)}) in the folder")
            loaded = cached_or_downloaded(AutoTokenizer, name)
            if len(loaded) < 3 or not loaded.encode("Hello world", add_special_tokens=False):
                # transformers 5.0 returns an empty tokenizer for some folders instead of failing
                raise ValueError(f"what it loaded has {len(loaded)} tokens and encodes nothing")
            return cls(loaded, name)
        except Exception as err:  # OSError offline, ValueError / others for folders that hold no tokenizer
            where = "the folder" if Path(name).is_dir() else "the Hugging Face Hub (needs internet)"
            raise KernelError(
                f"tokenizer.pretrained_name={name!r} could not be loaded from {where}: {type(err).__name__}: "
                f"{str(err).splitlines()[0][:200] if str(err) else ''}. Offline (e.g. Kaggle with internet off), "
                "attach a dataset that holds the tokenizer files (tokenizer.json, tokenizer_config.json) and set "
                "tokenizer.pretrained_name to that folder under /kaggle/input, or use tokenizer.mode=bpe_simple "
                "to train a tokenizer on your own text") from None

    def encode(self, text: str) -> list[int]:
        if getattr(self.hf, "is_fast", False):  # the backend itself: no warning that a document exceeds the context
            return self.hf.backend_tokenizer.encode(text, add_special_tokens=False).ids
        return self.hf.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if getattr(self.hf, "is_fast", False):
            return [e.ids for e in self.hf.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids])

    def to_dict(self) -> dict:
        """The name and, for a fast tokenizer, the tokenizer itself (vocabulary, rules, special tokens): a
        checkpoint then needs neither the folder nor the internet, and a folder changed since is noticed."""
        state = {"mode": self.mode, "name": self.name}
        if getattr(self.hf, "is_fast", False):
            state.update(tokenizer_json=self.hf.backend_tokenizer.to_str(),
                         special_tokens={k: str(v) for k, v in self.hf.special_tokens_map.items() if isinstance(v, str)},
                         clean_up_tokenization_spaces=bool(self.hf.clean_up_tokenization_spaces))
        return state | ({"chat_template": self.chat_template} if self.chat_template else {})

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.hf.save_pretrained(str(folder))
        write_atomic(folder / STATE_FILE, json.dumps({"mode": self.mode, "name": self.name}))


# --- Choosing, restoring -------------------------------------------------------------------------------

def document_separator(tokenizer: Tokenizer) -> str:
    """What goes between two documents: the end-of-document token if there is one, else a blank line."""
    if tokenizer.eos_id is None:
        return "\n\n"
    return tokenizer.decode([tokenizer.eos_id])


# Every tokenizer.mode and its class; the config's choices are these names, in this order.
TOKENIZERS: dict[str, type[RegisteredTokenizer]] = {cls.mode: cls for cls in (CharTokenizer, BPETokenizer, HFTokenizer)}


def tokenizer_class(mode: object, where: str) -> type[RegisteredTokenizer]:
    """The class registered for `mode`; `where` says where an unknown mode came from."""
    found = TOKENIZERS.get(mode) if isinstance(mode, str) else None  # saved states may hold anything
    if found is None:
        raise KernelError(f"unknown tokenizer mode {mode!r} {where}")
    return found


def tokenizer_from_dict(state: dict) -> Tokenizer:
    """Rebuild a tokenizer from what to_dict() returned (stored in every checkpoint)."""
    return tokenizer_class(state.get("mode"), "in saved tokenizer state").from_dict(state)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """A tokenizer saved by save(folder)."""
    folder = Path(folder)
    path = folder / STATE_FILE
    if not path.is_file():
        raise KernelError(f"no saved tokenizer in {folder} (expected {STATE_FILE})")
    try:
        return tokenizer_class(read_state(folder).get("mode"), "in saved tokenizer state").load(folder)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise KernelError(f"{folder} does not hold a valid saved tokenizer: {err}") from None
