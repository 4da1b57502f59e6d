"""## 21. Sampling

Text from the trained model, `sample.num_samples` per prompt (the settings are the config's `sample`
section; `python -m kernel sample` and `sample_from_run` change what they are given and keep a checkpoint's
own values for the rest). The prompt is encoded, then tokens are drawn one at a time from the softmax of the
last position's logits, divided by `temperature` (below 1 is more conservative; 0 always takes the most
likely token), limited to the `top_k` most likely tokens and to the smallest set whose probability reaches
`top_p`, until `max_new_tokens` or the end-of-document token. A key-value cache makes each new token one
forward step over that token alone; past the context length the window slides and the context is
recomputed, exactly as without the cache. Sampling uses its own seeded generator, so the same checkpoint,
prompt and seed give the same text.

The last part loads a trained run (a run folder's newest valid checkpoint, or a checkpoint file) to sample
from it: `sample_from_run` is what the notebook's last cell calls.
"""

import dataclasses
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from kernel.env import SAMPLES_FILE, KernelError, resolve_device, write_atomic
from kernel.config import DEVICE_PATTERN, Config, SampleConfig, config_from_dict, load_config, sample_problems
from kernel.tokenization import HFTokenizer, Tokenizer, tokenizer_from_dict
from kernel.chat import end_of_turn_id, question_ids
from kernel.data import TokenData
from kernel.model import GPT, KVCache, build_model
from kernel.hf_interop import apply_pretrained, is_model_folder, load_hf_weights
from kernel.lora import load_lora_run
from kernel.checkpoint import Checkpoint, checkpoints_in, given_checkpoint, load_checkpoint


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits (B, vocab) with everything outside the top-k and outside the top-p nucleus set to -inf."""
    if 0 < top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(dim=-1) - probs > top_p  # the mass before a token already reaches top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return logits


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: torch.Generator | None = None, eos_id: int | None = None,
             use_cache: bool = True, vocab_size: int | None = None) -> torch.Tensor:
    """Extend idx (B, T) by up to max_new_tokens tokens (greedy when temperature is 0). vocab_size: the
    tokenizer's, when the embedding has padding rows that must never be sampled."""
    window = model.config.max_positions  # the model's context (its block_size unless set)
    cache = KVCache(model.config.n_layer) if use_cache else None
    logits = model(idx[:, -window:], cache=cache)[0][:, -1, :]
    padding = slice(vocab_size, None) if vocab_size and vocab_size < model.config.vocab_size else None
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        if padding is not None:
            logits[:, padding] = float("-inf")
        if temperature == 0:
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
            next_token = torch.multinomial(probs, num_samples=1, generator=generator)
        idx = torch.cat((idx, next_token), dim=1)
        if eos_id is not None:
            finished |= next_token.squeeze(1) == eos_id
            if bool(finished.all()):
                break
        if step == max_new_tokens - 1:
            break  # the last token needs no forward pass
        if cache is not None and cache.length < window:
            logits = model(next_token, cache=cache)[0][:, -1, :]
        else:  # no cache, or the window slides: positions shift, so recompute the last window tokens
            cache = KVCache(model.config.n_layer) if use_cache else None
            logits = model(idx[:, -window:], cache=cache)[0][:, -1, :]
    return idx


def start_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The model needs a token to condition on: a prompt that encodes to nothing (empty, or whitespace that
    a BERT-style tokenizer drops) starts a new document: the end-of-text token, else a newline (not shown)."""
    if tokenizer.eos_id is not None:
        return [tokenizer.eos_id]
    if ids := tokenizer.encode("\n"):
        return ids
    raise KernelError(f"the prompt {prompt!r} encodes to no tokens, and this tokenizer has no end-of-text token "
                      "and drops newlines, so there is nothing to start from: give prompts with text "
                      "(sample.prompts, or --prompt 'The ')")


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> tuple[list[int], int]:
    """The ids generation starts from, and the index where the text shown begins: the prompt's ids, after
    the beginning-of-sequence token of a tokenizer that puts one before every document (as in training, and
    as transformers' generate() gets them); a prompt that encodes to nothing starts a new document."""
    ids = tokenizer.encode(prompt) if prompt else []
    if tokenizer.bos_id is not None:
        return [tokenizer.bos_id] + ids, 1
    if ids:
        return ids, 0
    start = start_ids(tokenizer, prompt)
    return start, len(start)


def sample_texts(model: GPT, tokenizer: Tokenizer, settings: SampleConfig, device: torch.device,
                 seed: int, chat: bool = False) -> list[tuple[str, str]]:
    """[(prompt, prompt + continuation), ...]: settings.num_samples per prompt in settings.prompts. `chat`:
    each prompt is a question (or a conversation so far, a list of messages) put into the chat template,
    and the sample is the answer, up to the end of the assistant's turn."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    stop = end_of_turn_id(tokenizer) if chat else tokenizer.eos_id
    samples = []
    for prompt in settings.prompts:
        start, shown_from = (question_ids(tokenizer, prompt), None) if chat else prompt_ids(tokenizer, prompt)
        idx = torch.tensor([start], dtype=torch.long, device=device)
        for _ in range(settings.num_samples):
            out = generate(model, idx, settings.max_new_tokens, settings.temperature, settings.top_k,
                           settings.top_p, generator, stop, vocab_size=tokenizer.vocab_size)
            ids = out[0, len(start) if chat else shown_from:].tolist()
            if chat and ids and ids[-1] == stop:
                ids = ids[:-1]  # the end of the turn is where the answer stops, not part of it
            samples.append((prompt_label(prompt), tokenizer.decode(ids)))
    model.train(was_training)
    return samples


def prompt_label(prompt: str | list[dict]) -> str:
    """A prompt as samples.txt names it: a conversation by its last turn."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def sampling_settings(saved: SampleConfig, name=lambda key: key, **changes) -> SampleConfig:
    """`saved` (a checkpoint's sample.* settings) with the values given (not None) changed. A value that cannot
    work stops here, in one line that names it as `name(field)` does (a flag, a keyword argument)."""
    settings = dataclasses.replace(saved, **{key: value for key, value in changes.items() if value is not None})
    if problems := sample_problems(settings, name):
        raise KernelError("; ".join(problems))
    return settings


def short_samples(settings: SampleConfig) -> SampleConfig:
    """What a stopped run samples at its end: one sample per prompt, as long as the samples at evaluations
    (their default length when those are off)."""
    return dataclasses.replace(settings, num_samples=1, max_new_tokens=min(
        settings.max_new_tokens, settings.eval_tokens or SampleConfig().eval_tokens))


def format_samples(samples: list[tuple[str, str]]) -> str:
    blocks = [f"=== sample {i + 1} | prompt {prompt!r} ===\n{text}\n" for i, (prompt, text) in enumerate(samples)]
    return "\n".join(blocks)


# --- Samples while it learns ---------------------------------------------------------------------------
# samples.txt holds, in order, one block per evaluation ("=== step N | prompt '...' ===", N without commas),
# then the final samples ("=== sample K | prompt '...' ===", what `python -m kernel sample RUN` repeats).

STEP_HEADER = re.compile(r"=== step (\d+) \| prompt .* ===")
FINAL_HEADER = re.compile(r"=== sample \d+ \| prompt .* ===")


def sample_blocks(text: str) -> list[tuple[int | None, str]]:
    """samples.txt cut into blocks, each from its header line to the next: (step, block) for a sample taken
    at an evaluation, (None, block) for a final sample (or text before any header)."""
    blocks: list[list] = []
    for line in text.splitlines(keepends=True):
        header = line.rstrip("\n")
        at_step = STEP_HEADER.fullmatch(header)
        if at_step or FINAL_HEADER.fullmatch(header) or not blocks:
            blocks.append([int(at_step[1]) if at_step else None, line])
        else:
            blocks[-1][1] += line
    return [(step, block) for step, block in blocks]


def final_samples(text: str) -> str:
    """The final samples of a samples.txt, without the samples taken at evaluations."""
    return "".join(block for step, block in sample_blocks(text) if step is None and FINAL_HEADER.match(block))


def run_sampling(settings: SampleConfig, data: TokenData) -> tuple[SampleConfig, bool]:
    """What a run samples (at evaluations and at its end), and whether as a chat: a run on conversations asks
    its first validation conversations' questions, unless sample.prompts is set."""
    questions = data.stats.get("prompts") if data.chat else None
    if not questions or settings.prompts != SampleConfig().prompts:
        return settings, data.chat
    return dataclasses.replace(settings, prompts=list(questions)), True


class EvalSamples:
    """One short sample at each evaluation (`sample.eval_tokens` tokens from the first prompt, the run's seed,
    so samples at different steps compare), printed and kept in samples.txt. A resumed run keeps the blocks
    its run had taken up to the checkpoint's step. Sampling that fails says so once and stops: it is a view
    of the training, never a reason to end it. Rank 0 only."""

    def __init__(self, path: Path, tokenizer: Tokenizer, settings: SampleConfig, device: torch.device, seed: int,
                 chat: bool = False):
        self.path, self.tokenizer, self.device, self.seed, self.chat = path, tokenizer, device, seed, chat
        self.settings = dataclasses.replace(settings, prompts=settings.prompts[:1] or [""], num_samples=1,
                                            max_new_tokens=settings.eval_tokens)
        self.blocks: list[str] = []
        self.enabled = settings.eval_tokens > 0

    def start(self, earlier: Path | None, step: int) -> None:
        """A new run starts samples.txt afresh; a resumed one keeps the evaluation samples of the checkpoint's
        run folder (`earlier`, maybe an attached earlier version's) up to its step."""
        self.blocks = []
        if earlier is not None and (earlier / SAMPLES_FILE).is_file():
            text = (earlier / SAMPLES_FILE).read_text(encoding="utf-8", errors="replace")
            self.blocks = [block for at, block in sample_blocks(text) if at is not None and at <= step]
        self.save()

    def save(self) -> None:
        if self.blocks:
            write_atomic(self.path, "".join(self.blocks))
        else:
            self.path.unlink(missing_ok=True)

    def __call__(self, model: GPT, step: int) -> str | None:
        """Sample at `step`; returns what to print (None when off)."""
        if not self.enabled:
            return None
        try:
            [(prompt, text)] = sample_texts(model, self.tokenizer, self.settings, self.device, self.seed, self.chat)
        except Exception as err:  # noqa: BLE001 - e.g. a prompt the tokenizer cannot encode
            print(f"[warn] no samples at evaluations ({type(err).__name__}: {err})")
            self.enabled = False
            return None
        self.blocks.append(f"=== step {step} | prompt {prompt!r} ===\n{text}\n\n")
        self.save()
        return f"[sample] step {step:,} (prompt {prompt!r}):\n{text}"

    def text(self) -> str:
        """The evaluation samples so far: what samples.txt holds before the final samples."""
        return "".join(self.blocks)


# --- From a trained run ------------------------------------------------------------------------------

def load_trained(path: str | Path, checkpoint: Checkpoint | None = None) -> tuple[Config, Tokenizer, GPT]:
    """The config, tokenizer and model of a checkpoint (pass it when it is already loaded)."""
    checkpoint = checkpoint or load_checkpoint(path)
    config = config_from_dict(checkpoint.config, f"{path} (saved config)")
    tokenizer = tokenizer_from_dict(checkpoint.tokenizer)
    if checkpoint.lora:  # only the adapters: the pretrained weights come again from model.init_from
        model = load_lora_run(config, tokenizer.vocab_size, checkpoint.lora, checkpoint.model, str(path))
        return config, tokenizer, model
    model = build_model(config, tokenizer.vocab_size)
    model.load_state_dict(checkpoint.model)
    return config, tokenizer, model


def load_transformers_folder(folder: Path) -> tuple[Config, Tokenizer, GPT]:
    """A transformers model folder (a run's hf/, a downloaded or attached model) as section 11 reads it for
    model.init_from: its shape, tokenizer and weights; its generation_config.json's sampling settings, if any."""
    config = load_config(None, {"model.init_from": str(folder)}, "the sampled folder", pretrained=apply_pretrained)
    tokenizer = HFTokenizer.load(config.tokenizer.pretrained_name)
    model = build_model(config, tokenizer.vocab_size)
    load_hf_weights(model, folder)
    generation = folder / "generation_config.json"
    saved = json.loads(generation.read_text(encoding="utf-8")) if generation.is_file() else {}
    sampling = {key: saved[key] for key in ("temperature", "top_k", "top_p") if key in saved}
    if saved and not saved.get("do_sample", True):
        sampling["temperature"] = 0.0  # greedy, as transformers would generate
    return dataclasses.replace(config, sample=dataclasses.replace(config.sample, **sampling)), tokenizer, model


def sample_checkpoint(path: str | Path, changes: dict, seed: int | None, device: str, name, chat: bool = False) -> str:
    """Samples from a checkpoint or a run folder. `changes`: sample.* values to use instead of the
    checkpoint's (None keeps its own), checked before anything is loaded; a bad one is named by `name`.
    `chat`: the prompts are questions for a model trained on conversations (see sample_texts)."""
    sampling_settings(SampleConfig(), name, **changes)
    if not DEVICE_PATTERN.fullmatch(device):
        raise KernelError(f"{name('device')} must be auto, cpu, mps, cuda or cuda:N, got {device!r}")
    device = resolve_device(device)
    folder = Path(path).expanduser()
    if folder.is_dir() and not checkpoints_in(folder) and is_model_folder(folder):
        print(f"[sample] {folder} (a transformers model folder)", file=sys.stderr)
        config, tokenizer, model = load_transformers_folder(folder)
    else:
        path, checkpoint = given_checkpoint(path)
        print(f"[sample] {path} (step {checkpoint.step:,})", file=sys.stderr)
        config, tokenizer, model = load_trained(path, checkpoint)
    settings = sampling_settings(config.sample, name, **changes)
    seed = config.train.seed if seed is None else seed  # the run's own samples.txt used train.seed too
    return format_samples(sample_texts(model.to(device), tokenizer, settings, device, seed, chat))


def sample_from_run(out_dir: str | Path, prompts: list[str] | str | None = None, *, max_new_tokens: int | None = None,
                    temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                    num_samples: int | None = None, seed: int | None = None, device: str = "auto",
                    chat: list[str] | str | None = None) -> str:
    """Samples from the newest valid checkpoint of a run folder (the notebook's last cell). What is left None
    is the run's own: its sample.* settings (SampleConfig's defaults unless the run set them) and train.seed.
    `chat`: questions (instead of prompts) for a model trained on conversations."""
    if chat is not None:
        prompts = chat
    prompts = [prompts] if isinstance(prompts, str) else prompts
    changes = dict(prompts=list(prompts) if prompts is not None else None, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_k=top_k, top_p=top_p, num_samples=num_samples)
    return sample_checkpoint(out_dir, changes, seed, device, lambda key: key, chat=chat is not None)
