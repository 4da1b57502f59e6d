"""## 22. Export to Hugging Face transformers

Every run ends by writing `hf/`: `config.json`, `model.safetensors`, `generation_config.json`, the tokenizer
files and a model card (`README.md`), which `AutoModelForCausalLM.from_pretrained`,
`AutoTokenizer.from_pretrained` and `pipeline("text-generation")` load offline. Each preset is exactly its
namesake's architecture, so only names and layout change: `gpt2` loads as `GPT2LMHeadModel` (its `Conv1D`
stores linear weights transposed; a model trained without biases gets zero biases, which compute the same),
`llama` as `LlamaForCausalLM` (the fused q/k/v matrix is split), `llama` with QK-norm as `Qwen3ForCausalLM`.
A LoRA run's adapters are merged into the weights (section 12), so `hf/` is a plain transformers model; its
adapters alone go to `hf-adapter/` in PEFT's format.

What transformers needs to generate well is set here: the generation config holds the run's sampling
settings (`sample.temperature`, `top_k`, `top_p`) and `max_length` = the context (transformers' classes
cannot slide a window past it, so `generate()` with its defaults stops there; `python -m kernel sample`
slides and goes further); the tokenizer knows the context (`model_max_length`) and pads on the left (a
padded batch of prompts generates correctly), with the end-of-text token unless it has a pad token of its
own; the end-of-text token stops generation and, for a tokenizer without a beginning-of-sequence token of
its own, also starts a prompt-less `generate()`. The embedding's padding rows are never generated.

`python -m kernel export CKPT OUT` does the same from a checkpoint. It never deletes what it did not
write: a folder holding other files is refused, and `--force` replaces only the export's own files there.
"""

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from kernel.env import CHECKPOINTS_DIR, SUMMARY_FILE, KernelError, count_words
from kernel.config import Config, SampleConfig, config_to_yaml
from kernel.tokenization import Tokenizer
from kernel.chat import end_of_turn_id
from kernel.model import GPT
from kernel.checkpoint import Checkpoint
from kernel.hf_interop import hf_config, hf_state_dict
from kernel.lora import lora_modules, merged_state_dict

# --- The folder ----------------------------------------------------------------------------------------

# The names an export writes (which tokenizer files depends on the tokenizer). A folder that holds nothing
# else, and no README.md but this program's model card, holds an earlier export that a new one may replace.
EXPORT_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors", "README.md",
                          "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                          "chat_template.jinja", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model",
                          "spiece.model"})
OLD_EXPORT_FILES = ("kernel_tokenizer.json",)  # written by earlier versions; removed when an export replaces them
CARD_TAG = "train-gpt-notebook"  # in the model card's tags: marks a README.md as this program's


@dataclass
class RunFacts:
    """What the model card says about the training run, as far as the exporter knows it."""
    name: str = ""                                  # the run's output folder
    steps: int | None = None
    tokens: int | None = None
    evaluation: dict = field(default_factory=dict)  # the last evaluation: val_loss, val_ppl, val_bpb
    data: dict = field(default_factory=dict)        # the data statistics (known at the end of a run)
    trained_on: str = ""                            # device, precision, processes, time
    sessions: list = field(default_factory=list)    # one entry per session that trained (see checkpoint.py)


def run_facts(summary: dict) -> RunFacts:
    """What the model card tells about the run, from its summary."""
    sessions = summary.get("sessions") or []
    over = f" over {len(sessions)} sessions" if len(sessions) > 1 else ""
    return RunFacts(name=Path(summary["out_dir"]).name, steps=summary["steps"], tokens=summary["tokens"],
                    evaluation={k: summary[k] for k in ("val_loss", "val_ppl", "val_bpb")}, data=summary["data"],
                    trained_on=f"{summary['device']}, {summary['dtype']}, {summary['processes']} process(es), "
                               f"{summary.get('train_seconds', summary['wall_s']):.0f} s of training{over}",
                    sessions=sessions)


def checkpoint_facts(path: Path, checkpoint: Checkpoint) -> RunFacts:
    """What the model card tells about a checkpoint's run: all of its summary.json when that describes this
    very checkpoint (the run's last), else what the checkpoint holds."""
    run_dir = path.parent.parent if path.parent.name == CHECKPOINTS_DIR else None
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8")) if run_dir else {}
    except (OSError, ValueError):
        summary = {}
    if summary.get("steps") == checkpoint.step and "data" in summary:
        return run_facts({**summary, "out_dir": str(run_dir)})
    return RunFacts(name=run_dir.name if run_dir else path.stem, steps=checkpoint.step, tokens=checkpoint.tokens,
                    evaluation=dict(checkpoint.last_eval), sessions=list(checkpoint.sessions))


def export_hf(model: GPT, tokenizer: Tokenizer, config: Config, folder: str | Path, run: RunFacts | None = None,
              force: bool = False) -> Path:
    """Write a transformers model folder: staged in a sibling folder, then moved in (each file appears whole).
    A folder holding files an export did not write is refused unless `force`, which replaces only the
    export's own files and keeps the others."""
    from safetensors.torch import save_file  # imported late: transformers is slow to import

    # the snippet names the folder as the user did, but an absolute path only by its name: no local folder
    # (a home directory) is published with the model
    location = str(folder) if not Path(folder).expanduser().is_absolute() else Path(folder).name
    folder = Path(folder).expanduser().resolve()
    check_export_target(folder, force)
    staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        special = save_hf_tokenizer(tokenizer, staging, model.config.max_positions)
        architecture = hf_config(model, special)
        architecture.save_pretrained(staging)
        merged = merged_state_dict(model) if lora_modules(model) else None  # LoRA: W + (alpha / r) B A
        save_file(hf_state_dict(model, merged), str(staging / "model.safetensors"), metadata={"format": "pt"})
        padding_rows = range(tokenizer.vocab_size, model.config.vocab_size)
        generation_config(config.sample, model.config.max_positions, {**special, "eos_token_id": stop_ids(tokenizer)},
                          padding_rows).save_pretrained(staging)
        card = ModelCardFacts(model, tokenizer, config, run or RunFacts(), architecture, location)
        write_model_card(card, staging / "README.md")
        move_into(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def check_export_target(folder: Path, force: bool) -> None:
    """Refuse, before writing anything, a file, or a folder holding what an export did not write (without force)."""
    if folder.exists() and not folder.is_dir():
        raise KernelError(f"{folder} is a file; export into a new or empty folder")
    if force or not folder.is_dir():
        return
    if foreign := foreign_entries(folder):
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise KernelError(f"{folder} already holds files that an export did not write ({shown}); nothing was "
                          "changed. Export into a new or empty folder, or add --force to replace only the "
                          "export's own files there (config.json, model.safetensors, tokenizer files, README.md) "
                          "and keep the others")


def foreign_entries(folder: Path) -> list[str]:
    """What in `folder` an export did not write: other names, subfolders, a README.md that is not our card."""
    foreign = []
    for entry in sorted(folder.iterdir()):
        ours = entry.is_file() and (entry.name in EXPORT_FILES or entry.name in OLD_EXPORT_FILES)
        if ours and entry.name == "README.md":
            ours = is_our_model_card(entry)
        if not ours:
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return foreign


def is_our_model_card(path: Path) -> bool:
    from huggingface_hub import metadata_load

    try:
        return CARD_TAG in ((metadata_load(path) or {}).get("tags") or [])
    except Exception:  # unreadable, or no valid YAML front matter: not a card this program wrote
        return False


def move_into(staging: Path, folder: Path) -> None:
    """The staged files into `folder`: the whole staging folder when there is none yet, else file by file
    (a file of the same name is replaced, nothing else is touched but what older versions wrote)."""
    if not folder.exists():
        os.replace(staging, folder)
        return
    for path in sorted(staging.iterdir()):
        os.replace(path, folder / path.name)
    for name in OLD_EXPORT_FILES:
        (folder / name).unlink(missing_ok=True)


# --- Tokenizer and generation settings -----------------------------------------------------------------

def save_hf_tokenizer(tokenizer: Tokenizer, staging: Path, context: int) -> dict:
    """The tokenizer files for transformers: the context as model_max_length, padding on the left (what a
    decoder-only model needs to generate for a padded batch) with the end-of-text token unless the
    tokenizer has a pad token of its own. Returns the special token ids for the configs."""
    from transformers import AutoTokenizer

    source = staging / "tokenizer-source"
    tokenizer.save(source)
    hf = AutoTokenizer.from_pretrained(str(source), model_max_length=context,  # a folder: never online
                                       padding_side="left")
    if hf.pad_token is None and hf.eos_token is not None:
        hf.pad_token = hf.eos_token
    hf.save_pretrained(str(staging))
    shutil.rmtree(source)
    eos = tokenizer.eos_id
    return {"bos_token_id": eos if hf.bos_token_id is None else hf.bos_token_id, "eos_token_id": eos,
            "pad_token_id": hf.pad_token_id}


def stop_ids(tokenizer: Tokenizer) -> int | list[int] | None:
    """Where generation ends: the end of text, and for a chat model the end of the assistant's turn first."""
    turn_end = end_of_turn_id(tokenizer) if tokenizer.chat_template else None
    if turn_end is None or turn_end == tokenizer.eos_id:
        return tokenizer.eos_id
    return [turn_end] + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])


def generation_config(sampling: SampleConfig, context: int, special: dict, padding_rows: range):
    """The run's sampling settings. `max_length` is the context, prompt included: generate() with these
    defaults never runs past the positions the model was trained on."""
    from transformers import GenerationConfig

    sampled = dict(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    return GenerationConfig(max_length=context, **(sampled if sampling.temperature > 0 else {"do_sample": False}),
                            # padding rows of the embedding (see model.vocab_multiple) are never generated
                            suppress_tokens=list(padding_rows) or None, **special)


# --- The model card ------------------------------------------------------------------------------------

ARCHITECTURE_WORDS = {"GPT2LMHeadModel": "GPT-2 (learned positions, LayerNorm, GELU)",
                      "LlamaForCausalLM": "Llama (rotary positions, RMSNorm, SwiGLU)",
                      "Qwen3ForCausalLM": "Llama with QK-norm, as Qwen3 (rotary positions, RMSNorm, SwiGLU)"}
EVAL_METRICS = (("val_loss", "loss", "validation loss (nats per token)", 4),  # (key, type, label, decimals)
                ("val_ppl", "perplexity", "validation perplexity", 2),
                ("val_bpb", "bits_per_byte", "validation bits per byte", 3))


@dataclass
class ModelCardFacts:
    model: GPT
    tokenizer: Tokenizer
    config: Config
    run: RunFacts
    hf_config: object   # the transformers config written beside the card
    location: str       # the folder as the user named it, for the snippet

    @property
    def architecture(self) -> str:
        return self.hf_config.architectures[0]

    def data_source(self) -> str:
        """What the card may publish: the run's data as section 7 names it (file names, Kaggle slugs), else the
        glob's last part, never a local folder."""
        glob_name = Path(self.config.data.text_glob).name
        return self.run.data.get("source") or glob_name or "the demo corpus (pydoc_data.topics)"


def write_model_card(facts: ModelCardFacts, path: Path) -> None:
    """README.md: YAML metadata (model-index with the validation figures) through huggingface_hub's
    ModelCardData, then what the model is, its figures, data, shape, how to load it and the config."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    evaluation = {k: v for k, v in facts.run.evaluation.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    results = [EvalResult(task_type="text-generation", dataset_type="text", dataset_name=facts.data_source(),
                          dataset_split="validation", metric_type=metric, metric_name=label,
                          metric_value=round(evaluation[key], decimals))
               for key, metric, label, decimals in EVAL_METRICS if key in evaluation]
    metadata = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                             model_name=facts.run.name or "model", eval_results=results or None,
                             tags=[facts.hf_config.model_type, "text-generation",
                                   "fine-tuned" if facts.config.model.init_from else "trained-from-scratch", CARD_TAG])
    body = [f"# {facts.run.name or 'model'}", "", card_summary(facts), "",
            "## Results", "", markdown_table(result_rows(facts.run)), "",
            "## Data", "", markdown_table(data_rows(facts)), "",
            "## Model", "", markdown_table(model_rows(facts)), "",
            "## Use", "", card_usage(facts), "",
            "## Training config", "", "```yaml", config_to_yaml(publishable(facts.config)).rstrip(), "```", ""]
    ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(body)).save(path)


def publishable(config: Config) -> Config:
    """The config with each local absolute path cut to its last two parts (`.../books/*.txt`): a model card is
    published, a home directory's name should not be."""
    def short(value):
        if isinstance(value, str) and value and os.path.isabs(os.path.expanduser(value)):
            return ".../" + "/".join(Path(os.path.expanduser(value)).parts[-2:])
        return value

    sections = {name: dataclasses.replace(part, **{f.name: short(getattr(part, f.name))
                                                   for f in dataclasses.fields(part)})
                for name, part in vars(config).items()}
    return dataclasses.replace(config, **sections)


def card_summary(facts: ModelCardFacts) -> str:
    start = facts.config.model.init_from
    how = ("trained from scratch on" if not start else f"fine-tuned from `{start}` on" if facts.run.steps != 0
           else f"`{start}` unchanged (no training step), evaluated on")
    return (f"A {count_words(facts.model.num_params())}-parameter language model {how} {facts.data_source()} "
            "with the *Train a GPT from scratch on Kaggle* notebook. Architecture: "
            f"{ARCHITECTURE_WORDS[facts.architecture]}; transformers loads it as `{facts.architecture}`.")


def markdown_table(rows: list[tuple[str, str]]) -> str:
    if not rows:
        return "Not recorded."
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {str(v).replace('|', chr(92) + '|')} |" for k, v in rows])


def result_rows(run: RunFacts) -> list[tuple[str, str]]:
    rows = [(label, f"{run.evaluation[key]:.{decimals}f}") for key, _, label, decimals in EVAL_METRICS
            if key in run.evaluation]
    if run.steps is not None:
        rows.append(("optimizer steps", f"{run.steps:,}"))
    if run.tokens is not None:
        rows.append(("training tokens seen", f"{run.tokens:,}"))
    rows += [("trained on", run.trained_on)] if run.trained_on else []
    return rows + [(f"session {i}", session_text(s)) for i, s in enumerate(run.sessions, 1) if len(run.sessions) > 1]


def session_text(session: dict) -> str:
    """One session of the training (a run, a notebook version), as the card's results table tells it."""
    seconds = session.get("train_seconds")
    took = f" in {seconds:,.0f} s" if seconds is not None else ""
    return (f"steps {session['started_step']:,} to {session['ended_step']:,}, {session['tokens']:,} tokens{took}, "
            f"stopped by {session['stopped_by'] or 'nothing yet (training when saved)'}")


def data_rows(facts: ModelCardFacts) -> list[tuple[str, str]]:
    d, tokenizer = facts.run.data, facts.tokenizer
    rows = [("source", facts.data_source())]
    for key, label in (("conversations", "conversations"), ("documents", "documents"), ("chars", "characters"),
                       ("bytes", "bytes"), ("train_tokens", "training split, tokens"),
                       ("val_tokens", "validation split, tokens")):
        if key in d:
            rows.append((label, f"{d[key]:,}"))
    if "loss_on" in d:  # conversations (section 8)
        rows.append(("trained on", "the assistant's answers only" if d["loss_on"] == "assistant" else "every token"))
    end = "`<|endoftext|>` between documents" if tokenizer.eos_id is not None else "no end-of-text token"
    template = f", {d.get('chat_template', 'its own')} chat template" if tokenizer.chat_template else ""
    return rows + [("tokenizer", f"{tokenizer.mode}, {tokenizer.vocab_size:,} tokens, {end}{template}")]


def model_rows(facts: ModelCardFacts) -> list[tuple[str, str]]:
    c = facts.model.config
    return [("architecture", f"`{facts.architecture}` ({c.arch})"),
            ("layers x width", f"{c.n_layer} x {c.n_embd}, {c.n_head} heads"
                               + (f" ({c.n_kv_head} key-value heads)" if c.n_kv_head != c.n_head else "")),
            ("context", f"{c.max_positions} tokens" + (f" (trained on windows of {c.block_size})"
                                                       if c.block_size != c.max_positions else "")),
            ("parameters", f"{facts.model.num_params():,}"),
            ("embedding rows", f"{c.vocab_size:,} (rows past the tokenizer's {facts.tokenizer.vocab_size:,} are "
                               "padding, never generated)")]


def card_usage(facts: ModelCardFacts) -> str:
    s, context = facts.config.sample, facts.model.config.max_positions
    settings = (f"temperature {s.temperature}, top-k {s.top_k}, top-p {s.top_p}" if s.temperature > 0
                else "greedy decoding")
    if facts.tokenizer.chat_template:  # a chat model: asked with messages, in its template
        call = ['chat = [{"role": "user", "content": "Hello!"}]',
                'print(generator(chat)[0]["generated_text"][-1]["content"])  # the answer, up to the end of its turn']
    else:
        call = ["print(generator(\"The \")[0][\"generated_text\"])"]
    return "\n".join([
        "```python", "from transformers import pipeline", "",
        f"generator = pipeline(\"text-generation\", model={json.dumps(facts.location)})  # this folder, or its Hub id",
        *call, "```", "",
        f"The generation config holds the run's sampling settings ({settings}) and `max_length` = {context}, the "
        "model's context, prompt included: transformers' model classes cannot slide a window "
        "past it, so generation stops there (or at `<|endoftext|>`). For longer text, `python -m kernel sample` "
        "on the run's checkpoint slides the window. The tokenizer pads on the left, so a batch of prompts "
        "of different lengths generates correctly."])
