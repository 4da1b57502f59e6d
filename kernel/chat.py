"""## 8. Conversations: instructions and chats, trained on the answers

Records that hold a conversation train a chat model: each becomes the ids of the model's own chat template,
and the loss is taken on the assistant's answers only.

* **Records** (`.jsonl`, `.json`, `.csv`, `.tsv`, `.parquet`), recognised by their fields with
  `data.format: auto`, required with `chat`: `messages` (`[{role, content}]`, a system turn allowed),
  ShareGPT's `conversations` (`[{from, value}]`: human / gpt / system), Alpaca's `instruction` (+ `input`,
  + `system`) / `output`, and `prompt` / `completion` (or `response`) or `question` / `answer`. A record
  that cannot be one (no answer, a turn without text, an unknown role) is skipped and counted by reason,
  as text records are. In a folder that mixes them, plain text (text files, text records) trains too,
  on every token, as language modelling.
* **The template**: the tokenizer's own chat template (a pretrained model's: Qwen3's, Llama 3's...), else
  a built-in one (ChatML's `<|im_start|>` / `<|im_end|>`, added to the vocabulary). The tokenizer saved
  into `hf/` carries it, so `tokenizer.apply_chat_template(messages)` gives exactly the ids trained on.
* **The loss** (`train.loss_on`): `assistant` (the default) trains on each answer: its text, what the
  template writes between the turn's header and it (Qwen3's empty `<think>` block: the model writes it when
  asked) and the token that ends the turn, so the model learns to stop; `all` on every token. The validation loss is taken on
  the same tokens.
* **Batches**: one conversation per row, padded to the longest in the batch: conversations never attend to
  one another, and each starts at position 0 as it will when the model is asked. The rows of a batch are
  of similar length (drawn 50 batches at a time and grouped), so padding stays small. A conversation longer
  than `model.block_size` + 1 tokens is cut there and counted (and skipped if no answer is left).
"""

import collections
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from kernel.env import KernelError
from kernel.config import Config
from kernel.sources import INVALID_JSON, Source, whole_records
from kernel.tokenization import BUILT_IN_CHAT_TEMPLATE, Tokenizer, tokenizer_class

IGNORED = -1  # a target id that adds no loss: a prompt's tokens and padding
ROLES = {"user": "user", "human": "user", "prompter": "user", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "model": "assistant", "chatgpt": "assistant", "system": "system"}
LIST_FIELDS = ("messages", "conversations")   # a list of turns
PAIRS = (("instruction", "output"), ("prompt", "completion"), ("prompt", "response"), ("question", "answer"))
CONVERSATION_FIELDS = set(LIST_FIELDS) | {field for pair in PAIRS for field in pair}
PEEKED_RECORDS = 20  # records read to tell a conversation file from a text file


# --- Recognising conversations ----------------------------------------------------------------------------

def is_conversation(record) -> bool:
    return isinstance(record, dict) and (any(f in record for f in LIST_FIELDS)
                                         or any(q in record and a in record for q, a in PAIRS))


def conversation(record: dict) -> list[dict] | str:
    """The record's turns as [{"role", "content"}], or why it cannot be a conversation."""
    turns = next((record[f] for f in LIST_FIELDS if f in record), None)
    if turns is not None:
        return listed_turns(turns)
    question, answer = next((q, a) for q, a in PAIRS if q in record and a in record)
    prompt = record[question]
    if question == "instruction" and isinstance(record.get("input"), str) and record["input"].strip():
        prompt = f"{prompt}\n\n{record['input']}"  # Alpaca's layout: the instruction, then its input
    system = record.get("system")
    messages = ([{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else [])
    return checked(messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": record[answer]}])


def listed_turns(turns) -> list[dict] | str:
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return "turns not a list of objects"
    messages = []
    for turn in turns:
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or role.lower() not in ROLES:
            return f"unknown role {str(role)[:20]!r}"
        messages.append({"role": ROLES[role.lower()], "content": content})
    return checked(messages)


def checked(messages: list[dict]) -> list[dict] | str:
    if any(not isinstance(m["content"], str) or not m["content"].strip() for m in messages):
        return "a turn without text"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn"
    if messages[0]["role"] == "assistant":
        return "starts with the assistant"
    return messages


def conversation_file(source: Source) -> bool:
    """Whether a record file holds conversations (by its first records)."""
    if source.format == "text":
        return False
    for count, record in enumerate(whole_records(source)):
        if is_conversation(record):
            return True
        if count + 1 >= PEEKED_RECORDS:
            break
    return False


def chat_files(sources: list[Source], data_format: str) -> list[Source]:
    """The files read as conversations: none for `text`; for `auto`, those whose records are; for `chat`,
    every file, and one that holds none is an error naming its fields."""
    if data_format == "text":
        return []
    found = [s for s in sources if conversation_file(s)]
    missing = [s for s in sources if s not in found]
    if data_format == "chat" and missing:
        raise KernelError(f"data.format=chat: {missing[0].name} holds no conversations ({first_fields(missing[0])}); "
                          f"records need one of: {', '.join(sorted(CONVERSATION_FIELDS))}. Use data.format=auto to "
                          "train on its text as well")
    return found


def first_fields(source: Source) -> str:
    if source.format == "text":
        return "it is a text file"
    record = next(iter(whole_records(source)), None)
    return f"its fields: {', '.join(map(str, record))}" if isinstance(record, dict) else "its records have no fields"


# --- Examples, in the corpus's order --------------------------------------------------------------------

def examples(sources: list[Source], chat: list[Source], skipped: collections.Counter) -> Iterator[list | str]:
    """Each conversation (its messages) and each text document (a string), file by file; a malformed
    conversation is counted in `skipped` by reason."""
    for source in sources:
        if source not in chat:
            for blocks in source.documents(skipped):
                yield "".join(blocks)
            continue
        for record in whole_records(source):  # (which turns a damaged file into one line naming it)
            found = conversation(record) if is_conversation(record) else (
                "invalid JSON line" if record is INVALID_JSON else "not a conversation")
            if isinstance(found, str):
                skipped[found] += 1
            else:
                yield found


def example_text(example: list | str) -> str:
    """What a tokenizer learns from: a document, or a conversation's turns."""
    return example if isinstance(example, str) else "\n".join(m["content"] for m in example)


@dataclass
class ExampleCorpus:
    """The training examples as the TrainingCorpus a tokenizer learns from (section 3)."""
    items: list

    def pieces(self) -> Iterator[str]:
        return map(example_text, self.items)

    def sample(self, max_chars: int) -> Iterator[str]:
        step = max(1, sum(len(example_text(e)) for e in self.items) // max(1, max_chars))
        return (example_text(e) for e in self.items[::step])


# --- Ids and the loss mask --------------------------------------------------------------------------------

class ChatEncoder:
    """Conversations into ids with the tokenizer's chat template, and the mask of the tokens trained on."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int, loss_on: str):
        self.tokenizer, self.hf = tokenizer, tokenizer.for_transformers()
        self.max_tokens, self.loss_on = max_tokens, loss_on
        self.turn_end, self.header = turn_end(self.hf), answer_header(self.hf)

    def encode(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray, bool] | str:
        """(ids, mask, whether it was cut) cut to max_tokens, or why the conversation cannot train. The ids
        are exactly `apply_chat_template(messages, tokenize=True)`'s: the rendered text, encoded."""
        text = self.hf.apply_chat_template(messages, tokenize=False)
        encoded = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = answer_spans(text, messages, self.turn_end, self.header)
        if spans is None:
            return "its answer's text changed by the chat template"
        ids = np.array(encoded["input_ids"], dtype=np.int64)
        mask = np.array([any(start < end_ and end > start_ for start_, end_ in spans)
                         for start, end in encoded["offset_mapping"]], dtype=bool)
        if self.loss_on == "all":
            mask[:] = True
        truncated = len(ids) > self.max_tokens
        ids, mask = ids[:self.max_tokens], mask[:self.max_tokens]
        if not mask[1:].any():
            return f"no answer within model.block_size + 1 = {self.max_tokens} tokens"
        return ids, mask, truncated

    def text_rows(self, text: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """A text document (with its end-of-document token) in rows of max_tokens, every token trained."""
        eos = [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]
        ids = np.array(self.tokenizer.encode(text) + eos, dtype=np.int64)
        step = self.max_tokens - 1  # rows overlap by one token: each one's first token is the last one's target
        return [(ids[i:i + self.max_tokens], np.ones(len(ids[i:i + self.max_tokens]), dtype=bool))
                for i in range(0, max(1, len(ids) - 1), step)]


def turn_end(hf) -> str:
    """What the template puts right after an answer to end the turn (`<|im_end|>`, `<|eot_id|>`...): the
    special token it starts with, or the text before the next line."""
    answer = "0b7f9c2e"
    text = hf.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": answer}],
                                  tokenize=False)
    after = text[text.rindex(answer) + len(answer):]
    special = [t for t in map(str, hf.all_special_tokens) if after.startswith(t)]
    return max(special, key=len) if special else after.split("\n")[0]


def answer_header(hf) -> str:
    """What the template writes to open the assistant's turn (what add_generation_prompt adds)."""
    question = [{"role": "user", "content": "a"}]
    plain = hf.apply_chat_template(question, tokenize=False)
    return hf.apply_chat_template(question, tokenize=False, add_generation_prompt=True).removeprefix(plain)


def answer_spans(text: str, messages: list[dict], end: str, header: str = "") -> list[tuple[int, int]] | None:
    """The character spans of each answer in the rendered text: from the end of its turn's header (so what a
    template puts between them, such as Qwen3's empty `<think>` block, is trained on: the model must write it
    when asked) to the turn's end marker; None when an answer's text is not found in order (a template that
    rewrites answers)."""
    spans, cursor = [], 0
    for message in messages:
        content = message["content"]
        start = text.find(content, cursor)
        if start < 0:
            content = content.strip()
            start = text.find(content, cursor)
        if start < 0:
            if message["role"] == "assistant":
                return None
            continue
        stop = start + len(content)
        if message["role"] == "assistant":
            if end and text.startswith(end, stop):
                stop += len(end)
            opened = text.rfind(header, cursor, start) if header else -1
            spans.append((opened + len(header) if opened >= 0 else start, stop))
        cursor = stop
    return spans


def question_ids(tokenizer: Tokenizer, prompt: str | list[dict]) -> list[int]:
    """A question (or a conversation so far) in the chat template, ending where the assistant's answer starts."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return templated(tokenizer).apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                    return_dict=True)["input_ids"]


def templated(tokenizer: Tokenizer):
    """The transformers tokenizer with its chat template (a transformers folder's carries it there)."""
    hf = tokenizer.for_transformers()
    if not isinstance(hf.chat_template, str):
        raise KernelError("this model was not trained on conversations (its tokenizer has no chat template): "
                          "sample it with --prompt, which continues the text")
    return hf


def end_of_turn_id(tokenizer: Tokenizer) -> int | None:
    """The id that ends an assistant's turn, where the template ends it with one token: generation stops there."""
    hf = templated(tokenizer)
    ids = hf(turn_end(hf), add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else tokenizer.eos_id


# --- The corpus as rows -------------------------------------------------------------------------------------

@dataclass
class Rows:
    """One split as rows: every row's ids one after another, which of them are trained on, where each starts."""
    ids: np.ndarray      # int64
    mask: np.ndarray     # bool
    offsets: np.ndarray  # int64, rows + 1

    def targets(self) -> int:
        """The tokens trained on: masked in, and not a row's first (which is only ever an input)."""
        return int(self.mask.sum() - self.mask[self.offsets[:-1]].sum())


def encode_corpus(sources: list[Source], chat: list[Source], config: Config,
                  tokenizer: Tokenizer | None) -> tuple[Tokenizer, dict[str, Rows], dict]:
    """The tokenizer (learnt from the training examples unless given, made ready for conversations), each
    split's rows, and what the summary reports: conversations, skips by reason, truncations. The last
    data.val_fraction of the examples (in the corpus's order) is validation."""
    skipped = collections.Counter()
    items = list(examples(sources, chat, skipped))
    split_at = int(len(items) * (1 - config.data.val_fraction))
    if not 0 < split_at < len(items):
        raise KernelError(f"{len(items)} conversation(s) and document(s) in all ({dict(skipped) or 'none skipped'}): "
                          "too few to hold both training and validation examples "
                          f"(data.val_fraction={config.data.val_fraction:g}); add data")
    if tokenizer is None:
        settings = config.tokenizer
        tokenizer = tokenizer_class(settings.mode, "in tokenizer.mode").build(settings, ExampleCorpus(items[:split_at]))
    tokenizer = tokenizer.with_chat()
    encoder = ChatEncoder(tokenizer, config.model.block_size + 1, config.train.loss_on)
    counts = collections.Counter()
    splits = {name: encoded_rows(encoder, part, skipped, counts)
              for name, part in (("train", items[:split_at]), ("val", items[split_at:]))}
    sizes = [(len(text), len(text.encode("utf-8"))) for text in map(example_text, items)]
    stats = {"format": "chat", "conversations": counts["conversations"], "documents": counts["documents"],
             "truncated": counts["truncated"], "skipped_records": dict(skipped), "loss_on": config.train.loss_on,
             "chat_template": "built-in" if tokenizer.chat_template == BUILT_IN_CHAT_TEMPLATE else "the tokenizer's",
             "chars": sum(chars for chars, _ in sizes), "bytes": sum(size for _, size in sizes), "invalid_bytes": {},
             "formats": {}, "val_bytes": sum(size for _, size in sizes[split_at:]), "vocab_size": tokenizer.vocab_size,
             "trained_tokens": {name: rows.targets() for name, rows in splits.items()},
             **{f"{name}_tokens": int(rows.ids.size) for name, rows in splits.items()},
             "prompts": [prompt_of(e) for e in items[split_at:] if not isinstance(e, str)][:4]}
    if skipped:
        print(f"[data] records skipped: {', '.join(f'{n:,} {why}' for why, n in skipped.items())}")
    return tokenizer, splits, stats


def encoded_rows(encoder: ChatEncoder, items: list, skipped: collections.Counter,
                 counts: collections.Counter) -> Rows:
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    for item in items:
        if isinstance(item, str):
            counts["documents"] += 1
            rows += encoder.text_rows(item)
            continue
        encoded = encoder.encode(item)
        if isinstance(encoded, str):
            skipped[encoded] += 1
            continue
        counts["conversations"] += 1
        counts["truncated"] += encoded[2]
        rows.append(encoded[:2])
    if not rows:
        raise KernelError(f"no conversation could be trained on ({dict(skipped)})")
    lengths = [len(ids) for ids, _ in rows]
    return Rows(np.concatenate([ids for ids, _ in rows]), np.concatenate([mask for _, mask in rows]),
                np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def prompt_of(messages: list[dict]) -> list[dict]:
    """A conversation up to its first answer: what samples during training ask."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:first]


# --- Batches: one conversation per row ----------------------------------------------------------------------

GROUPED_BATCHES = 50  # batches drawn at once and grouped by length (as transformers' group_by_length)


class ConversationSampler:
    """Random rows (conversations, or pieces of text documents) of one split, padded to the longest in
    the batch; targets of untrained tokens and of padding are IGNORED. Same interface and state as the
    window sampler (section 9). Rows of similar length go together: GROUPED_BATCHES batches' worth are
    drawn at once, sorted by length, cut into batches, and those served in random order, so padding stays
    small (BENCHMARKS 10) while every row is still drawn at random."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray, batch_size: int, seed: int,
                 pad_id: int):
        self.ids, self.mask, self.offsets, self.batch_size, self.pad_id = ids, mask, offsets, batch_size, pad_id
        self.generator = torch.Generator().manual_seed(seed)
        self.pending: list[list[int]] = []  # the grouped batches not served yet

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.windows(self.draw(self.batch_size))

    def draw(self, count: int) -> torch.Tensor:
        """The rows of the next batch of `count` (a step's global batch: each process takes its slice)."""
        if not self.pending or len(self.pending[0]) != count:
            self.pending = self.grouped(count)
        return torch.tensor(self.pending.pop(0), dtype=torch.int64)

    def grouped(self, count: int) -> list[list[int]]:
        rows = torch.randint(len(self.offsets) - 1, (count * GROUPED_BATCHES,), generator=self.generator)
        lengths = torch.from_numpy(np.diff(np.asarray(self.offsets)))[rows]
        by_length = rows[torch.argsort(lengths, stable=True)].tolist()
        batches = [by_length[i:i + count] for i in range(0, len(by_length), count)]
        return [batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()]

    def windows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spans = [(int(self.offsets[r]), int(self.offsets[r + 1])) for r in rows.tolist()]
        width = max(stop - start for start, stop in spans) - 1
        x = torch.full((len(spans), width), self.pad_id, dtype=torch.int64)
        y = torch.full((len(spans), width), IGNORED, dtype=torch.int64)
        for row, (start, stop) in enumerate(spans):
            ids = torch.from_numpy(np.array(self.ids[start:stop], dtype=np.int64))  # a copy of the memory map
            trained = torch.from_numpy(np.array(self.mask[start + 1:stop], dtype=bool))
            x[row, :len(ids) - 1] = ids[:-1]
            y[row, :len(ids) - 1] = torch.where(trained, ids[1:], IGNORED)
        return x, y

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "pending": [list(batch) for batch in self.pending]}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.pending = [list(batch) for batch in state.get("pending", [])]
