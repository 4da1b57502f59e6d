"""## 11. Transformers interop

The bridge between this notebook's model and `transformers` model folders, so the model section speaks
only its own config (the tokenizers `transformers` loads are section 3's `hf` mode):

* **Finding a model** (`model.init_from`): a folder with `config.json` and weights, the one model folder
  under a folder you name (an attached Kaggle Model), or a Hugging Face Hub id, downloaded only then (the
  one thing here that may touch the network).
* **Reading its config** into our shape (GPT-2, Llama, Qwen3; what the model code cannot hold, such as RoPE
  scaling or sliding windows, is refused by name): its values and its tokenizer replace the defaults' and
  presets'; a value you set that differs is an error naming both.
* **One table of tensor names**: where each of our tensors lives in a `transformers` checkpoint, read one way
  to load pretrained weights (`load_hf_weights`) and the other way to export (`hf_state_dict`).
* **Writing a config**: our shape as a `transformers` config (`hf_config`), for the export of section 22.
"""

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from kernel.env import KernelError, attached_folders, kaggle_root
from kernel.config import Config, ConfigError, apply_layer, dotted_to_layer, get_key
from kernel.tokenization import TOKENIZER_FILES, holds_tokenizer, hub_unreachable
from kernel.model import GPT, GPTConfig


# --- Starting from a pretrained model (model.init_from) -------------------------------------------------
# A transformers model folder decides the model's exact shape and its tokenizer. Its values replace those of
# the defaults and bundled presets; a value the user set (their own config file, --set, the parameters cell)
# that differs is an error naming both. The way back, our shape as a transformers config, is hf_config below.

PRETRAINED_ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM", "Qwen3ForCausalLM")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
MODEL_SEARCH_DEPTH = 7  # /kaggle/input/models/<owner>/<model>/<framework>/<variation>/<version>/ and one more
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # gpt2, Qwen/Qwen3-0.6B


def is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / name).is_file() for name in WEIGHT_FILES)


def model_folders_under(root: Path) -> list[Path]:
    """Folders below `root` that hold a transformers model (config.json and weights), hidden folders skipped."""
    found = []
    for folder, subfolders, _ in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".")) if depth < MODEL_SEARCH_DEPTH else []
        if is_model_folder(Path(folder)):
            found.append(Path(folder))
    return found


def find_model_folder(name: str, weights: bool = True) -> Path:
    """The model folder model.init_from names: the folder itself; the one model folder under it; on Kaggle, the
    attached model whose path holds the name (a Kaggle Model: /kaggle/input/models/<owner>/<model>/<framework>/
    <variation>/<version>/, or the older /kaggle/input/<model>/...); else, for a name that can be one, a Hugging
    Face Hub id (downloaded, which needs internet). Nothing else touches the network. `weights=False`: a folder
    holding only config.json will do (a memory plan needs nothing more)."""
    path = Path(name).expanduser()
    where = f"model.init_from={name!r}"
    if (path / "config.json").is_file():
        if weights and not is_model_folder(path):
            raise ConfigError(f"{where}: {path} holds config.json but no weights ({', '.join(WEIGHT_FILES)})")
        return path
    found = model_folders_under(path) if path.is_dir() else attached_folders(name, is_model_folder)
    if len(found) == 1:
        return found[0]
    if found:
        listed = "\n  - ".join(str(f) for f in found)
        raise ConfigError(f"{where}: {len(found)} models match; set model.init_from to one of them:\n  - {listed}")
    if path.is_dir():
        raise ConfigError(f"{where}: no transformers model under {path} (a folder with config.json and "
                          f"{' or '.join(WEIGHT_FILES)})")
    if HUB_ID.fullmatch(name):
        return download_model(name)
    attached = model_folders_under(kaggle_root() / "input") if (kaggle_root() / "input").is_dir() else []
    listed = "; attached models: " + ", ".join(map(str, attached)) if attached else ""
    raise ConfigError(f"{where}: no such folder{listed}. Give the folder of a transformers model (config.json, "
                      "weights, tokenizer files), or on Kaggle attach it with Add Input > Models and give its name "
                      "(e.g. qwen-3) or its folder under /kaggle/input/models")


def download_model(repo_id: str) -> Path:
    """A Hub id's config, weights and tokenizer files: the Hugging Face cache's copy, else downloaded into it when
    the Hub can be reached (asked first: offline, one clear error instead of a minute of retries)."""
    from huggingface_hub import snapshot_download  # imported late: only a Hub id needs it

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    try:
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the cache (its error types vary by version)
            if reason := hub_unreachable():
                raise OSError(f"it is not in the local cache, and {reason}") from None
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # offline, no such repository, gated: all end the same way
        raise ConfigError(
            f"model.init_from={repo_id!r} is not a folder here, and downloading it from the Hugging Face Hub failed "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}). With internet off (as on "
            "Kaggle by default) attach the model instead (Add Input > Models, or a dataset holding its files) and set "
            "model.init_from to its folder under /kaggle/input") from None
    if not is_model_folder(folder):
        raise ConfigError(f"model.init_from={repo_id!r}: the Hub repository has no config.json with safetensors "
                          "weights")
    return folder


def pretrained_settings(folder: Path) -> dict[str, object]:
    """The model.* values of a transformers model folder, exactly. What the model code cannot hold (another
    architecture, RoPE scaling, attention biases, sliding windows) is an error naming the value."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.init_from: {path} cannot be read ({type(err).__name__}: {err})") from None
    by_type = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    architecture = (raw.get("architectures") or [by_type.get(raw.get("model_type"))])[0]
    if architecture not in PRETRAINED_ARCHITECTURES:
        raise ConfigError(f"model.init_from: {path} is a {architecture or raw.get('model_type')!r} model; supported "
                          f"are {', '.join(PRETRAINED_ARCHITECTURES)} (the architectures this program exports)")
    from transformers import AutoConfig  # imported late: transformers is slow to import

    try:
        hf = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)  # a folder: never online
    except Exception as err:  # transformers raises several types for a config it cannot read
        raise ConfigError(f"model.init_from: transformers cannot read {path} ({type(err).__name__}: "
                          f"{str(err)[:200]})") from None
    settings = gpt2_settings(hf, path) if architecture == "GPT2LMHeadModel" else llama_settings(hf, path)
    # the embedding keeps exactly the model's rows: a tokenizer of up to that many tokens rounds up to them;
    # model.size "" because the shape is the model's own, never planned
    return {**settings, "model.tie_embeddings": bool(hf.tie_word_embeddings), "model.vocab_multiple": hf.vocab_size,
            "model.size": ""}


def refuse_unsupported(path: Path, checks: list[tuple[str, object, bool, str]]) -> None:
    """checks: (key, value, whether the model code can hold it, what it can hold)."""
    problems = [f"{key}={value!r} (supported: {supported})" for key, value, ok, supported in checks if not ok]
    if problems:
        raise ConfigError(f"model.init_from: {path} needs what this program's model code cannot hold: "
                          f"{'; '.join(problems)}")


def gpt2_settings(hf, path: Path) -> dict[str, object]:
    refuse_unsupported(path, [
        ("activation_function", hf.activation_function, hf.activation_function in ("gelu_new", "gelu_pytorch_tanh"),
         "gelu_new, GPT-2's tanh GELU"),
        ("scale_attn_weights", hf.scale_attn_weights, hf.scale_attn_weights, "true"),
        ("scale_attn_by_inverse_layer_idx", hf.scale_attn_by_inverse_layer_idx, not hf.scale_attn_by_inverse_layer_idx,
         "false"),
        ("add_cross_attention", hf.add_cross_attention, not hf.add_cross_attention, "false")])
    return {"model.arch": "gpt2", "model.n_layer": hf.n_layer, "model.n_head": hf.n_head, "model.n_kv_head": hf.n_head,
            "model.n_embd": hf.n_embd, "model.head_dim": hf.n_embd // hf.n_head,
            "model.mlp_hidden": hf.n_inner or 4 * hf.n_embd, "model.bias": True, "model.qk_norm": False,
            "model.norm_eps": hf.layer_norm_epsilon, "model.max_positions": hf.n_positions}


def llama_settings(hf, path: Path) -> dict[str, object]:
    """Llama and Qwen3 (Llama with QK-norm and an explicit head width)."""
    rope = dict(getattr(hf, "rope_parameters", None) or {})  # transformers 5: rope_theta and any scaling
    layer_types = set(getattr(hf, "layer_types", None) or ["full_attention"])
    kv_heads = hf.num_key_value_heads or hf.num_attention_heads
    refuse_unsupported(path, [
        ("hidden_act", hf.hidden_act, hf.hidden_act == "silu", "silu"),
        ("attention_bias", hf.attention_bias, not hf.attention_bias, "false"),
        ("mlp_bias", getattr(hf, "mlp_bias", False), not getattr(hf, "mlp_bias", False), "false"),
        ("rope_parameters", rope, rope.get("rope_type", "default") == "default" and "rope_theta" in rope,
         "rope_type default, no RoPE scaling"),
        ("use_sliding_window", getattr(hf, "use_sliding_window", False), not getattr(hf, "use_sliding_window", False),
         "false"),
        ("layer_types", sorted(layer_types), layer_types == {"full_attention"}, "full_attention in every layer"),
        ("num_key_value_heads", kv_heads, hf.num_attention_heads % kv_heads == 0, "a divisor of num_attention_heads")])
    return {"model.arch": "llama", "model.n_layer": hf.num_hidden_layers, "model.n_head": hf.num_attention_heads,
            "model.n_kv_head": kv_heads, "model.n_embd": hf.hidden_size,
            "model.head_dim": getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            "model.mlp_hidden": hf.intermediate_size, "model.bias": False, "model.qk_norm": hf.model_type == "qwen3",
            "model.norm_eps": hf.rms_norm_eps, "model.rope_theta": rope["rope_theta"],
            "model.max_positions": hf.max_position_embeddings}


def pretrained_tokenizer(folder: Path, config: Config, chosen: dict[str, str]) -> dict[str, object]:
    """The folder's own tokenizer; for a folder without one, the hf tokenizer the user names."""
    if holds_tokenizer(folder):
        return {"tokenizer.mode": "hf", "tokenizer.pretrained_name": str(folder)}
    if config.tokenizer.mode == "hf" and "tokenizer.pretrained_name" in chosen:
        return {}
    raise ConfigError(f"model.init_from: {folder} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): attach the "
                      "model's tokenizer as well and set tokenizer.mode=hf and tokenizer.pretrained_name to its folder")


def apply_pretrained(config: Config, chosen: dict[str, str], weights: bool = True) -> None:
    """model.init_from: the folder's shape and tokenizer replace what the defaults and presets said. A value the
    user chose that differs is an error naming both; a preset's context longer than the model's is shortened.
    `weights=False`: the shape alone, from a folder that may hold only config.json (for a memory plan)."""
    folder = find_model_folder(config.model.init_from, weights)
    shape = pretrained_settings(folder)  # first: an architecture the model code cannot hold is the error to see
    tokenizer = pretrained_tokenizer(folder, config, chosen) if weights or holds_tokenizer(folder) else {}
    settings = {**shape, **tokenizer}
    origin = f"model.init_from={config.model.init_from!r} ({folder / 'config.json'})"
    theirs = Config()
    apply_layer(theirs, dotted_to_layer(settings, origin), origin)
    conflicts = [f"{key}: {get_key(config, key)!r} in {chosen[key]}, {get_key(theirs, key)!r} in the model"
                 for key in settings if key in chosen and get_key(config, key) != get_key(theirs, key)]
    if conflicts:
        raise ConfigError(f"{origin} decides the model's shape and tokenizer, and values you set differ from "
                          "it:\n  - " + "\n  - ".join(conflicts) + "\nRemove them (the model's own values are "
                          "used), or remove model.init_from to train a model from scratch")
    apply_layer(config, dotted_to_layer(settings, origin), origin)
    if "model.block_size" not in chosen:
        config.model.block_size = min(config.model.block_size, config.model.max_positions)


# --- The same weights under transformers' names ----------------------------------------------------------
# Each entry: (our tensor, its transformers name(s), how they relate): "same"; "transposed" (GPT-2's Conv1D
# stores a linear layer's weight as (in, out)); "stacked" (our c_attn is q, k and v one above the other).
# Export reads the table one way (hf_state_dict), model.init_from the other (load_hf_weights).

def hf_layout(c: GPTConfig) -> list[tuple[str, tuple[str, ...], str]]:
    head = [] if c.tie_embeddings else [("lm_head.weight", ("lm_head.weight",), "same")]
    if c.arch == "gpt2":  # nanoGPT kept GPT-2's names: only the linear layers' layout differs
        same = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]
        transposed = []
        for i in range(c.n_layer):
            h = f"transformer.h.{i}."
            same += [f"{h}{norm}.{kind}" for norm in ("ln_1", "ln_2") for kind in ("weight", "bias")]
            linears = [f"{h}{linear}." for linear in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
            same += [linear + "bias" for linear in linears]
            transposed += [linear + "weight" for linear in linears]
        return [(n, (n,), "same") for n in same] + [(n, (n,), "transposed") for n in transposed] + head
    table = [("transformer.wte.weight", ("model.embed_tokens.weight",), "same"),
             ("transformer.ln_f.weight", ("model.norm.weight",), "same")]
    renamed = {"attn.c_proj": "self_attn.o_proj", "mlp.w_gate": "mlp.gate_proj", "mlp.w_up": "mlp.up_proj",
               "mlp.c_proj": "mlp.down_proj", "ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"}
    if c.qk_norm:
        renamed.update({"attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"})
    for i in range(c.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        qkv = tuple(f"{theirs}self_attn.{p}_proj.weight" for p in "qkv")
        table.append((ours + "attn.c_attn.weight", qkv, "stacked"))
        table += [(f"{ours}{a}.weight", (f"{theirs}{b}.weight",), "same") for a, b in renamed.items()]
    return table + head


def hf_state_dict(model: GPT, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Our weights (or `state`, the same names: e.g. LoRA's merged weights) under transformers' names and layout
    (a tied head is stored once, as the embedding)."""
    c, ours = model.config, model.state_dict() if state is None else state
    exported = {}
    for name, theirs, layout in hf_layout(c):
        tensor = ours.get(name)
        if tensor is None:  # a gpt2 model trained without biases: zero biases compute the same
            tensor = torch.zeros(ours[name.removesuffix("bias") + "weight"].size(0))
        parts = tensor.split(model.transformer.h[0].attn.sizes) if layout == "stacked" else [
            tensor.t() if layout == "transposed" else tensor]
        exported.update(zip(theirs, parts))
    return {name: tensor.detach().float().cpu().contiguous().clone() for name, tensor in exported.items()}


# Tensors a checkpoint may hold that are no weights: GPT-2's causal-mask buffers, old Llama rotary tables.
NOT_WEIGHTS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def load_hf_weights(model: GPT, folder: Path, tokens: int | None = None) -> int:
    """Copy the weights of the transformers checkpoint in `folder` (a model of this model's shape) into the
    model, one tensor at a time; returns the number of tensors read. A tensor missing, left over or of
    another shape is an error, but for the rows of the embedding (and output layer) that a tokenizer of
    `tokens` tokens has beyond the file's (chat markers added, section 8): they start at the mean row."""
    c, ours = model.config, model.state_dict()
    prefix = "transformer." if c.arch == "gpt2" else "model."
    readers = {name if name.startswith(prefix) or name == "lm_head.weight" else prefix + name: read
               for name, read in open_weights(folder).items()}  # saved from the base model: names lack the prefix
    layout = hf_layout(c)
    wanted = {name for _, theirs, _ in layout for name in theirs}
    missing = sorted(wanted - set(readers))
    unused = sorted(n for n in set(readers) - wanted if not n.endswith(NOT_WEIGHTS) and n != "lm_head.weight")
    if missing or unused:
        raise KernelError(f"model.init_from: the weights in {folder} do not fit its config.json: "
                          f"{describe_names('missing', missing)}{describe_names('not used', unused)}")
    with torch.no_grad():
        for name, theirs, how in layout:
            parts = [readers[n]() for n in theirs]
            value = torch.cat(parts) if how == "stacked" else parts[0].t() if how == "transposed" else parts[0]
            if value.shape != ours[name].shape and grows(value, ours[name], tokens):
                value = torch.cat([value, value.mean(0, keepdim=True).expand(len(ours[name]) - len(value), -1)])
            if value.shape != ours[name].shape:
                raise KernelError(shape_mismatch(folder, name, theirs, value.shape, ours[name].shape))
            ours[name].copy_(value)
    return len(wanted)


def grows(file_rows: torch.Tensor, our_rows: torch.Tensor, tokens: int | None) -> bool:
    """Whether a token table of the file may be grown to ours: the tokenizer has tokens beyond its rows."""
    return (tokens is not None and file_rows.dim() == 2 and file_rows.shape[1] == our_rows.shape[1]
            and len(file_rows) < tokens <= len(our_rows))


def fit_vocabulary(config: Config, tokens: int) -> Config:
    """A pretrained model's embedding has its own row count (model.vocab_multiple is set to it); a tokenizer
    with more tokens (chat markers added) gets rows for them, rounded up to 64, instead of twice as many."""
    rows = config.model.vocab_multiple
    if not config.model.init_from or tokens <= rows:
        return config
    print(f"[model] {tokens - rows} token(s) beyond the pretrained embedding's {rows:,} rows (the chat markers): "
          "rows added, starting at the mean of the others")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_multiple=64))


def describe_names(what: str, names: list[str]) -> str:
    return f"{what}: {', '.join(names[:4])}{f' and {len(names) - 4} more' if len(names) > 4 else ''}; " if names else ""


def shape_mismatch(folder: Path, name: str, theirs: tuple[str, ...], shape, expected) -> str:
    if name == "transformer.wte.weight":  # the rows are the tokenizer's count rounded up to the model's rows
        return (f"model.init_from: the embedding in {folder} has {shape[0]:,} rows, fewer than the tokenizer's "
                f"tokens need ({expected[0]:,}): use the tokenizer that came with the model")
    return f"model.init_from: {'+'.join(theirs)} in {folder} is {tuple(shape)}, the model needs {tuple(expected)}"


def open_weights(folder: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """Every tensor of the checkpoint in `folder` (model.safetensors or its shards, else pytorch_model.bin or
    its shards), each read only when called: the model is never held twice in memory."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        try:
            if (folder / index).is_file():
                files = sorted(set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values()))
            elif (folder / single).is_file():
                files = [single]
            else:
                continue
            return {name: read for file in files for name, read in tensor_readers(folder / file).items()}
        except Exception as err:  # a damaged index or weight file: safetensors and torch raise several types
            raise KernelError(f"model.init_from: the weights in {folder} cannot be read ({type(err).__name__}: "
                              f"{str(err)[:200]})") from None
    raise KernelError(f"model.init_from: {folder} holds no weights (model.safetensors or pytorch_model.bin)")


def tensor_readers(path: Path) -> dict[str, Callable[[], torch.Tensor]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open  # imported late: only model.init_from reads safetensors

        handle = safe_open(str(path), framework="pt")
        return {name: functools.partial(handle.get_tensor, name) for name in handle.keys()}
    try:  # memory-mapped: tensors are paged in when copied, not all at once
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: functools.partial(state.__getitem__, name) for name in state}


# --- Our shape as a transformers config ----------------------------------------------------------------

def hf_config(model: GPT, special: dict):
    """Our shape as a transformers config (pretrained_settings above reads one back for model.init_from)."""
    from transformers import GPT2Config, LlamaConfig, Qwen3Config

    c = model.config
    if c.arch == "gpt2":
        return GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_positions, n_embd=c.n_embd, n_layer=c.n_layer,
                          n_head=c.n_head, n_inner=None if c.mlp_hidden == 4 * c.n_embd else c.mlp_hidden,
                          activation_function="gelu_new", resid_pdrop=c.dropout, embd_pdrop=c.dropout,
                          attn_pdrop=c.dropout, layer_norm_epsilon=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
                          architectures=["GPT2LMHeadModel"], **special)
    config_class, architecture = (Qwen3Config, "Qwen3ForCausalLM") if c.qk_norm else (LlamaConfig, "LlamaForCausalLM")
    return config_class(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_hidden,
                        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                        head_dim=c.head_dim, max_position_embeddings=c.max_positions, rms_norm_eps=c.norm_eps,
                        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, hidden_act="silu",
                        attention_bias=False, attention_dropout=c.dropout, tie_word_embeddings=c.tie_embeddings,
                        architectures=[architecture], **special)
