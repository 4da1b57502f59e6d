"""## 5. Configuration

Every knob lives in one typed dataclass per section (`model`, `tokenizer`, `data`, `train`, `sample`).
A run's config is built in layers, each checked strictly as it is applied:

    defaults (below) -> the `extends` chain -> the YAML file -> overrides (`--set`, the parameters cell)

An unknown key or a wrong type stops the run before anything is written, with a message that names the
layer and the key and suggests the closest valid key; values that cannot work (alone or together) are then
all reported at once. The resolved config is saved as `config.yaml` in the output folder and beside the
checkpoints, and loading that file again gives the same config.

With `model.init_from` (a `transformers` model folder: GPT-2, Llama or Qwen3) the model's own
`config.json` then decides the model's shape and its tokenizer (section 11): it overrides the defaults and
the bundled presets, and a value you set yourself that differs from it is an error naming both.
"""

import dataclasses
import difflib
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kernel.env import KernelError
from kernel.bundled_configs import BUNDLED_CONFIGS
from kernel.tokenization import TOKENIZERS
from kernel.values import parse_auto_or_bool, parse_auto_or_count, parse_duration, parse_steps_or_duration


class ConfigError(KernelError):
    """A config file, key or value that cannot be used."""


# --- The schema ----------------------------------------------------------------------------------------

# Fields that take "auto" or a whole number: field metadata {"auto_count": (least, what the number counts)}.
PROCESSES = {"auto_count": (1, "a number of processes")}
STEPS = {"auto_count": (0, "a number of steps")}
AUTO_OR_BOOL = {"auto_or_bool": True}  # true, false, or auto (the program decides)
STEPS_OR_DURATION = {"steps_or_duration": True}  # a whole number of steps, or a duration such as "20m"


@dataclass
class ModelConfig:
    arch: str = "gpt2"                    # gpt2 (exactly GPT-2) | llama (RoPE, RMSNorm, SwiGLU, no biases)
    n_layer: int = 6                      # transformer blocks
    n_head: int = 6                       # attention heads per block
    n_embd: int = 384                     # residual stream width; divisible by n_head unless head_dim is set
    block_size: int = 256                 # context length in tokens (of the training windows)
    vocab_multiple: int = 64              # embedding rows rounded up to a multiple of this (faster matmuls)
    dropout: float = 0.0                  # 0 when data is plentiful; 0.1-0.2 helps on tiny corpora
    bias: bool = True                     # gpt2: biases in Linear and LayerNorm layers, as in GPT-2
    qk_norm: bool = False                 # llama: RMSNorm on each head's queries and keys (as Qwen3)
    rope_theta: float = 10000.0           # llama: base of the rotary position embedding
    # The exact shape of a pretrained model (model.init_from sets them); 0 means the preset's rule.
    n_kv_head: int = 0                    # llama: key/value heads (fewer than n_head: grouped-query); 0: n_head
    head_dim: int = 0                     # width of one head; 0: n_embd / n_head
    mlp_hidden: int = 0                   # MLP hidden width; 0: gpt2 4 x n_embd, llama 8/3 x n_embd (to 32s)
    norm_eps: float = 0.0                 # LayerNorm / RMSNorm epsilon; 0: gpt2 1e-5, llama 1e-6
    tie_embeddings: bool = True           # the output head shares the token embedding's matrix
    max_positions: int = 0                # positions the model holds (gpt2's table, generation's window); 0: block_size
    gradient_checkpointing: bool = False  # recompute each block in backward: much less memory, ~30% slower
    size: str = ""                        # auto: the shape the time budget buys (section 20); "25M": that many parameters
    init_from: str = ""                   # start from a transformers model: its folder (or one above); a Hub id online


@dataclass
class TokenizerConfig:
    mode: str = "char"                    # char | bpe_simple (trained on your text) | hf (an existing one)
    vocab_size: int = 8192                # bpe_simple: vocabulary size to train
    train_sample_mb: int = 200            # bpe_simple: train on at most this much text, spread over the corpus
    pretrained_name: str = ""             # hf: a local tokenizer folder or a Hugging Face Hub id


@dataclass
class DataConfig:
    text_glob: str = ""                   # files to train on, '**' recurses; empty: Kaggle's inputs, else a demo corpus
    val_fraction: float = 0.1             # share of the corpus held out for validation (its tail)
    workers: int = 0                      # processes that tokenize; 0: one per CPU
    text_field: str = ""                  # records' text field (a.b: nested; a,b: first present); empty: text/content
    format: str = "auto"                  # auto (conversations where records hold them) | text | chat (section 8)
    cache_dir: str = ""                   # token files are cached here; empty: <output folder>/cache, on Kaggle /tmp


@dataclass
class TrainConfig:
    seed: int = 1337                      # seeds weights, batches and sampling
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    devices: int | str = field(default="auto", metadata=PROCESSES)  # auto (every GPU) | N processes
    dtype: str = "auto"                   # auto | float32 | bfloat16 | float16 (auto: by hardware)
    compile: bool | str = field(default=False, metadata=AUTO_OR_BOOL)  # torch.compile the model; auto: when it pays
    batch_size: int = 12                  # sequences per micro-batch
    grad_accum_steps: int = 1             # micro-batches per optimizer step
    max_steps: int | str = field(default=2000, metadata=STEPS)  # optimizer steps; auto: the time budget decides
    lr: float = 1e-3                      # peak learning rate
    min_lr: float = 1e-4                  # floor the cosine decay ends at
    warmup_steps: int = 100               # linear warm-up from 0 to lr
    schedule: str = "cosine"              # cosine | wsd (warmup-stable-decay); both end at max_steps or the budget
    decay_fraction: float = 0.2           # wsd: the final share of the run that decays to min_lr
    weight_decay: float = 0.1             # decay on matrices (not on biases, norms)
    optimizer: str = "adamw"              # adamw | muon (Muon for the blocks' matrices, AdamW for the rest)
    muon_momentum: float = 0.95           # muon: momentum of the hidden matrices' updates
    beta1: float = 0.9                    # AdamW: decay of the gradient's running mean
    beta2: float = 0.99                   # AdamW: decay of the squared gradient's running mean
    grad_clip: float = 1.0                # max global gradient norm; 0 disables clipping
    eval_interval: int = 250              # steps between evaluations
    eval_batches: int = 20                # batches per split in one evaluation
    log_interval: int = 10                # steps between metrics lines
    checkpoint_interval: int | str = field(default=250, metadata=STEPS_OR_DURATION)  # steps between checkpoints, or a duration ("20m"); 0: only the final one
    keep_checkpoints: int = 2             # newest checkpoints kept on disk (plus the best by val loss)
    nan_patience: int = 20                # stop after this many consecutive steps with a NaN/inf loss
    time_budget: float | None = field(default=None, metadata={"duration": True})  # wall-clock limit
    resume: str = "auto"                  # auto (latest checkpoint in the output folder) | never | a path
    lora_rank: int = 0                    # LoRA (model.init_from): adapters' rank; 0 trains every weight
    lora_alpha: float = 16.0              # LoRA: the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0             # LoRA: dropout on the adapters' input
    lora_targets: str = "attn"            # LoRA: attn (q, k, v, o) | attn_mlp (and gate, up, down) | a list: q,v
    loss_on: str = "assistant"            # conversations: assistant (the answers' tokens) | all (every token)


@dataclass
class SampleConfig:
    """How text is sampled: at the end of a run, and the defaults of `python -m kernel sample`,
    `sample_from_run` and the notebook's last cell, which take a checkpoint's saved values for what they
    do not set. The help texts are the command line's."""
    prompts: list[str] = field(default_factory=lambda: ["\n"], metadata={"help": "one sample per prompt"})
    max_new_tokens: int = field(default=300, metadata={"help": "tokens per sample"})
    temperature: float = field(default=0.8, metadata={"help": "below 1 is more conservative; 0 is greedy"})
    top_k: int = field(default=200, metadata={"help": "sample among the k most likely tokens; 0 keeps all"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling: the smallest set of tokens whose "
                                                        "probability reaches p; 1 keeps all"})
    num_samples: int = field(default=1, metadata={"help": "samples per prompt"})
    eval_tokens: int = field(default=64, metadata={"help": "tokens of the short sample printed and kept in "
                                                           "samples.txt at each evaluation (from the first prompt); "
                                                           "0: none"})


def sample_problems(settings: SampleConfig, name=lambda key: f"'sample.{key}'") -> list[str]:
    """Sampling values that cannot work, one message each; `name` says how the caller calls a field (a config
    key, a command-line flag, a keyword argument)."""
    s, problems = settings, []
    for key, least in (("max_new_tokens", 0), ("top_k", 0), ("num_samples", 1), ("eval_tokens", 0)):
        if getattr(s, key) < least:
            problems.append(f"{name(key)} must be >= {least}, got {getattr(s, key)}")
    if not s.temperature >= 0:  # written so that NaN fails too
        problems.append(f"{name('temperature')} must be >= 0 (0 is greedy), got {s.temperature}")
    if not 0 < s.top_p <= 1:
        problems.append(f"{name('top_p')} must be in (0, 1], got {s.top_p}")
    return problems


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


CHOICES = {
    "model.arch": ["gpt2", "llama"],
    "tokenizer.mode": TOKENIZERS.keys(),  # a live view: a mode registered later is accepted too
    "train.dtype": ["auto", "float32", "bfloat16", "float16"],
    "train.schedule": ["cosine", "wsd"],
    "train.optimizer": ["adamw", "muon"],
    "train.loss_on": ["assistant", "all"],
    "data.format": ["auto", "text", "chat"],
}
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def section_fields(section: str) -> dict[str, dataclasses.Field]:
    section_type = typing.get_type_hints(Config)[section]
    return {f.name: f for f in dataclasses.fields(section_type)}


def all_keys() -> list[str]:
    return [f"{s}.{k}" for s in section_fields_names() for k in section_fields(s)]


def section_fields_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


# Names other trainers (nanoGPT, transformers, litgpt) use for our keys: suggested before spelling matches.
SYNONYMS = {
    "learning_rate": "lr", "max_lr": "lr", "lr_min": "min_lr", "max_iters": "max_steps", "iters": "max_steps",
    "num_steps": "max_steps", "train_steps": "max_steps", "epochs": "max_steps", "num_train_epochs": "max_steps",
    "warmup": "warmup_steps", "warmup_iters": "warmup_steps", "gradient_accumulation_steps": "grad_accum_steps",
    "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size", "max_grad_norm": "grad_clip",
    "n_layers": "n_layer", "num_layers": "n_layer", "num_hidden_layers": "n_layer", "n_heads": "n_head",
    "num_heads": "n_head", "num_attention_heads": "n_head", "d_model": "n_embd", "hidden_size": "n_embd",
    "n_embed": "n_embd", "context_length": "block_size", "seq_len": "block_size", "max_seq_length": "block_size",
    "max_position_embeddings": "max_positions", "n_positions": "max_positions", "eval_iters": "eval_batches",
    "eval_every": "eval_interval", "save_interval": "checkpoint_interval", "save_every": "checkpoint_interval",
    "precision": "dtype", "num_key_value_heads": "n_kv_head", "n_kv_heads": "n_kv_head",
    "intermediate_size": "mlp_hidden", "n_inner": "mlp_hidden", "rms_norm_eps": "norm_eps",
    "layer_norm_epsilon": "norm_eps", "tie_word_embeddings": "tie_embeddings", "model_name_or_path": "init_from",
    "pretrained": "init_from", "base_model": "init_from", "checkpoint_dir": "init_from",
}


def did_you_mean(word: str, options: Sequence[str]) -> str:
    """A hint for a word that is not one of `options`: the option it is another library's name for (SYNONYMS),
    or the option, or synonym, closest to it in spelling (`learnin_rate` is `lr`), else the valid options."""
    section, _, key = word.rpartition(".")
    named = {option: option for option in options}
    named.update({".".join(filter(None, [section, other])): option for other, ours in SYNONYMS.items()
                  if (option := ".".join(filter(None, [section, ours]))) in options})
    close = [word] if word in named else difflib.get_close_matches(word, list(named), n=1, cutoff=0.5)
    if close and close[0] != word and close[0].rpartition(".")[0] == section:  # the shared section is no likeness
        close = close if difflib.SequenceMatcher(None, key, close[0].rpartition(".")[2]).ratio() >= 0.4 else []
    if not close:
        return f"; valid: {', '.join(sorted(options))}"
    hint = " (it counts optimizer steps, not epochs)" if "epoch" in close[0] else ""
    return f"; did you mean {named[close[0]]!r}?{hint}"


# --- Values: types ------------------------------------------------------------------------------------

def coerce_value(key: str, spec: dataclasses.Field, hint, value):
    """The value converted to the field's type, or a ValueError saying what was expected."""
    if spec.metadata.get("duration"):
        return parse_duration(value)
    if spec.metadata.get("auto_or_bool"):
        return parse_auto_or_bool(value)
    if spec.metadata.get("steps_or_duration"):
        return parse_steps_or_duration(value)
    if "auto_count" in spec.metadata:
        return parse_auto_or_count(value, *spec.metadata["auto_count"])
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string: accept what float() accepts
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected a string, got {value!r}")
    if typing.get_origin(hint) is list:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError(f"expected a list of strings, got {value!r}")
    raise TypeError(f"no rule for {key}'s type {hint}")  # a schema bug, not user input


# --- Layers --------------------------------------------------------------------------------------------

def apply_layer(config: Config, layer: Mapping, origin: str) -> None:
    """Set every key of one nested mapping ({section: {key: value}}) on `config`, checking as we go."""
    sections = section_fields_names()
    for section, values in layer.items():
        if section not in sections:
            raise ConfigError(f"{origin}: unknown section {section!r}{did_you_mean(str(section), sections)}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping of keys to values, got {values!r}")
        fields_by_name = section_fields(section)
        hints = typing.get_type_hints(type(getattr(config, section)))
        for key, value in values.items():
            if key not in fields_by_name:
                raise ConfigError(f"{origin}: unknown key '{section}.{key}'"
                                  f"{did_you_mean(f'{section}.{key}', all_keys())}")
            try:
                coerced = coerce_value(f"{section}.{key}", fields_by_name[key], hints[key], value)
            except ValueError as err:
                raise ConfigError(f"{origin}: '{section}.{key}': {err}") from None
            setattr(getattr(config, section), key, coerced)


def parse_overrides(overrides: Mapping | Sequence[str] | None, origin: str) -> dict:
    """{"train.lr": 3e-4} or ["train.lr=3e-4"] -> {"train.lr": 3e-4}; string values are read as YAML scalars."""
    if not overrides:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    parsed = {}
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"{origin}: {item!r} is not of the form section.key=value (e.g. train.lr=3e-4)")
        dotted, text = item.split("=", 1)
        try:
            parsed[dotted.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:  # e.g. a glob such as **/*.txt: YAML reads '*' as an alias; keep it as text
            parsed[dotted.strip()] = text
    return parsed


def dotted_to_layer(pairs: Mapping, origin: str) -> dict:
    """{"train.lr": 3e-4} -> {"train": {"lr": 3e-4}}."""
    layer: dict[str, dict] = {}
    for dotted, value in pairs.items():
        if not isinstance(dotted, str) or dotted.count(".") != 1:
            raise ConfigError(f"{origin}: {dotted!r} must name section.key{did_you_mean(str(dotted), all_keys())}")
        section, key = dotted.split(".")
        layer.setdefault(section, {})[key] = value
    return layer


# --- Files: bundled or on disk, with `extends` ---------------------------------------------------------

def read_config_source(name: str, relative_to: Path | None = None) -> tuple[str, str, Path | None]:
    """(origin label, YAML text, folder for relative `extends`) for a path or a bundled config name."""
    candidates = [Path(name)] if relative_to is None else [relative_to / name, Path(name)]
    for path in candidates:
        if path.is_file():
            return str(path), read_utf8(path), path.parent
    bundled = Path(name).name
    if bundled in BUNDLED_CONFIGS:
        return f"configs/{bundled}", BUNDLED_CONFIGS[bundled], None
    raise ConfigError(f"config {name!r} not found: it is neither a file nor a bundled config"
                      f"{did_you_mean(bundled, list(BUNDLED_CONFIGS))}")


def read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as "
                          "UTF-8 (most editors: Save with encoding > UTF-8)") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None


def parse_yaml_mapping(origin: str, text: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: a config file must be a mapping of sections, got {type(data).__name__}")
    return data


def file_layers(name: str) -> list[tuple[str, dict]]:
    """The layers of a config file, base-most first, following `extends` (loops are an error)."""
    chain: list[tuple[str, dict]] = []
    seen: list[str] = []
    relative_to = None
    while name is not None:
        origin, text, folder = read_config_source(name, relative_to)
        if origin in seen:
            raise ConfigError(f"{origin}: 'extends' loops back: {' -> '.join(seen + [origin])}")
        seen.append(origin)
        data = parse_yaml_mapping(origin, text)
        parent = data.pop("extends", None)
        if parent is not None and not isinstance(parent, str):
            raise ConfigError(f"{origin}: 'extends' must name one config file, got {parent!r}")
        chain.append((origin, data))
        name, relative_to = parent, folder
    return list(reversed(chain))


def load_config(source: str | None = None, overrides: Mapping | Sequence[str] | None = None,
                overrides_origin: str = "--set", pretrained: Callable[[Config, dict], None] | None = None) -> Config:
    """Defaults -> `extends` chain -> file -> overrides, then the cross-field checks. This reads no file but the
    YAML and never the network: `pretrained` (main passes section 11's `apply_pretrained`) applies
    model.init_from's shape and tokenizer, told which keys the user set and where ("section.key" -> origin)."""
    config = Config()
    layers = file_layers(source) if source else []
    layers.append((overrides_origin, dotted_to_layer(parse_overrides(overrides, overrides_origin), overrides_origin)))
    chosen: dict[str, str] = {}  # "section.key" -> the origin of a value the user set (a bundled preset's is not)
    for origin, layer in layers:
        apply_layer(config, layer, origin)
        if Path(origin).name not in BUNDLED_CONFIGS:
            chosen.update({f"{section}.{key}": origin for section, values in layer.items() for key in values})
    if config.model.arch == "gpt2" and config.model.qk_norm and "model.qk_norm" not in chosen:
        config.model.qk_norm = False  # a preset's QK-norm (llama only) does not follow a user's switch to gpt2
    given_shape = [key for key in SHAPE_KEYS if key in chosen]
    if config.model.size and given_shape and "model.size" not in chosen:  # the user's shape, not the preset's plan
        print(f"[config] {', '.join(given_shape)} given: the preset's model.size={config.model.size} is not used")
        config.model.size = ""
    if config.model.init_from and pretrained is not None:
        pretrained(config, chosen)
    validate(config)
    return config


SHAPE_KEYS = ("model.n_layer", "model.n_embd", "model.n_head")


# --- Values that cannot work together ------------------------------------------------------------------

def validate(config: Config) -> None:
    """Collect every impossible value, then fail once with all of them."""
    m, t, s = config.model, config.train, config.sample
    problems = []

    def require(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    for key in ("model.vocab_multiple", "model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "tokenizer.train_sample_mb",
                "train.batch_size", "train.grad_accum_steps", "train.eval_interval",
                "train.eval_batches", "train.log_interval", "train.keep_checkpoints", "train.nan_patience"):
        require(get_key(config, key) >= 1, f"'{key}' must be >= 1, got {get_key(config, key)}")
    for key in ("data.workers", "train.warmup_steps"):
        require(get_key(config, key) >= 0, f"'{key}' must be >= 0, got {get_key(config, key)}")
    problems += model_problems(m)
    require(0.0 < config.data.val_fraction <= 0.5,
            f"'data.val_fraction' must be in (0, 0.5], got {config.data.val_fraction}")
    require(t.lr > 0, f"'train.lr' must be > 0, got {t.lr}")
    require(0 <= t.min_lr <= t.lr, f"'train.min_lr' must be between 0 and train.lr ({t.lr}), got {t.min_lr}")
    require(0 < t.decay_fraction <= 1, f"'train.decay_fraction' must be in (0, 1], got {t.decay_fraction}")
    require(t.weight_decay >= 0, f"'train.weight_decay' must be >= 0, got {t.weight_decay}")
    require(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "'train.beta1'/'train.beta2' must be in [0, 1)")
    require(0 <= t.muon_momentum < 1, f"'train.muon_momentum' must be in [0, 1), got {t.muon_momentum}")
    require(m.size in ("", "auto") or re.fullmatch(r"\d+(\.\d+)?\s*[KMBkmb]", m.size) is not None,
            f"'model.size' must be empty (the shape as given), auto, or a parameter count such as 25M, got {m.size!r}")
    require(t.grad_clip >= 0, f"'train.grad_clip' must be >= 0 (0 disables), got {t.grad_clip}")
    problems += sample_problems(s)
    problems += lora_problems(config)
    mode_class = TOKENIZERS.get(config.tokenizer.mode)  # an unknown mode is reported with CHOICES below
    problems += mode_class.config_problems(config.tokenizer) if mode_class else []
    require(DEVICE_PATTERN.fullmatch(t.device) is not None,
            f"'train.device' must be auto, cpu, mps, cuda or cuda:N, got {t.device!r}")
    require(bool(t.resume.strip()), "'train.resume' must be auto, never or a checkpoint path, got ''")
    for key, options in CHOICES.items():
        value = get_key(config, key)
        require(value in options, f"'{key}' must be one of {', '.join(options)}, got {value!r}"
                                  f"{did_you_mean(str(value), options) if len(options) > 1 else ''}")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


LORA_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")  # transformers' q_proj ... down_proj
LORA_TARGET_SETS = {"attn": ("q", "k", "v", "o"), "attn_mlp": LORA_PROJECTIONS}


def lora_projections(targets: str) -> tuple[str, ...]:
    """train.lora_targets as projection names (q, k, v, o, gate, up, down; "q_proj" is read as "q")."""
    if targets.strip() in LORA_TARGET_SETS:
        return LORA_TARGET_SETS[targets.strip()]
    named = [t.strip().removesuffix("_proj") for t in targets.split(",") if t.strip()]
    return tuple(p for p in LORA_PROJECTIONS if p in named) + tuple(n for n in named if n not in LORA_PROJECTIONS)


def lora_problems(config: Config) -> list[str]:
    """train.lora_*: adapters need a pretrained Llama or Qwen3 model to adapt."""
    m, t = config.model, config.train
    if t.lora_rank < 0:
        return [f"'train.lora_rank' must be >= 0 (0: no LoRA, every weight trains), got {t.lora_rank}"]
    if t.lora_rank == 0:
        return []
    problems = [] if m.init_from else ["'train.lora_rank' needs model.init_from: LoRA adapts a pretrained model"]
    if m.arch != "llama":  # GPT-2's fused Conv1D c_attn has no q_proj/k_proj/v_proj for PEFT's names
        problems.append("'train.lora_rank': LoRA supports Llama and Qwen3 models, not GPT-2 (its fused c_attn has no "
                        "separate q/k/v projections to adapt and export); fine-tune GPT-2 fully (train.lora_rank=0)")
    if not t.lora_alpha > 0:
        problems.append(f"'train.lora_alpha' must be > 0, got {t.lora_alpha}")
    if not 0 <= t.lora_dropout < 1:
        problems.append(f"'train.lora_dropout' must be in [0, 1), got {t.lora_dropout}")
    projections = lora_projections(t.lora_targets)
    unknown = [p for p in projections if p not in LORA_PROJECTIONS]
    if unknown or not projections:
        problems.append(f"'train.lora_targets' must be attn, attn_mlp or a comma list of {', '.join(LORA_PROJECTIONS)}"
                        f", got {t.lora_targets!r}")
    return problems


def model_problems(m: ModelConfig) -> list[str]:
    """Model settings that cannot work together, one message each."""
    heads, problems = max(m.n_head, 1), []
    checks = [(getattr(m, key) >= 0, f"'model.{key}' must be >= 0 (0: the preset's rule), got {getattr(m, key)}")
              for key in ("n_kv_head", "head_dim", "mlp_hidden", "norm_eps", "max_positions")]
    checks += [
        ((m.head_dim and m.arch == "llama") or m.n_embd % heads == 0,
         f"'model.n_embd' ({m.n_embd}) must be divisible by 'model.n_head' ({m.n_head}); "
         f"e.g. n_embd={heads * max(1, round(m.n_embd / heads))}"),
        (m.arch == "llama" or m.head_dim in (0, m.n_embd // heads),
         f"'model.head_dim' ({m.head_dim}) must be n_embd / n_head for gpt2 (or 0)"),
        (m.arch == "llama" or m.n_kv_head in (0, m.n_head),
         "'model.n_kv_head' needs model.arch=llama (GPT-2 has no grouped-query attention)"),
        (m.n_kv_head <= 0 or m.n_head % m.n_kv_head == 0,
         f"'model.n_head' ({m.n_head}) must be a multiple of 'model.n_kv_head' ({m.n_kv_head})"),
        (m.arch != "llama" or (m.head_dim or m.n_embd // heads) % 2 == 0,
         f"llama: a head's width ({m.head_dim or m.n_embd // heads}) must be even (rotary positions turn pairs)"),
        (m.max_positions == 0 or m.block_size <= m.max_positions,
         f"'model.block_size' ({m.block_size}) must be <= 'model.max_positions' ({m.max_positions}), the positions "
         "the model holds" + (", its context as model.init_from's folder says" if m.init_from else "")),
        (not m.qk_norm or m.arch == "llama", "'model.qk_norm' needs model.arch=llama (GPT-2 has no QK-norm)"),
        (m.rope_theta > 0, f"'model.rope_theta' must be > 0, got {m.rope_theta}"),
        (0.0 <= m.dropout < 1.0, f"'model.dropout' must be in [0, 1), got {m.dropout}")]
    return problems + [message for ok, message in checks if not ok]


def get_key(config: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


# --- Saving --------------------------------------------------------------------------------------------

def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def config_to_yaml(config: Config) -> str:
    """The resolved config as YAML that load_config reads back to an equal Config."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)


def config_from_dict(data: Mapping, origin: str) -> Config:
    config = Config()
    apply_layer(config, data, origin)
    validate(config)
    return config
