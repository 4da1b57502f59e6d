"""model.init_from: a transformers model folder (made here by transformers itself, never downloaded) decides the
model's shape and tokenizer; its weights load exactly, train further, resume and export unchanged."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM)

from kernel.checkpoint import checksum_path, list_checkpoints, load_checkpoint
from kernel.config import ConfigError
from kernel.main import resolve_config
from kernel.inputs import demo_sources
from kernel.env import KernelError
from kernel.sample import load_trained
from kernel.main import run
from kernel.hf_interop import load_hf_weights
from kernel.tokenization import END_OF_DOCUMENT, BPETokenizer, HFTokenizer
from kernel.model import build_model
from kernel.memory import HEADROOM, memory_needed
from tests.conftest import TINY

TEXT = "".join(s.text for s in demo_sources()[:5])
VOCAB = 320  # embedding rows: more than the tokenizer's 300 tokens, as in Qwen3 (151,936 rows, 151,669 tokens)

# Small models with what real ones have and our presets do not: grouped-query attention, a head width that is
# not width / heads, MLP widths off our rules, untied heads, other epsilons and rotary bases, long contexts.
SOURCES = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                               n_inner=96, layer_norm_epsilon=1e-4)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=5e5,
        tie_word_embeddings=False)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1e6,
        tie_word_embeddings=True)),
}


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer.train([TEXT], vocab_size=300)


def save_tokenizer(tokenizer: BPETokenizer, folder: Path) -> None:
    """The tokenizer as a model folder holds it: tokenizer.json and tokenizer_config.json from transformers."""
    PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token=END_OF_DOCUMENT).save_pretrained(folder)


def make_source(kind: str, folder: Path, tokenizer: BPETokenizer | None = None, **save):
    """A transformers model with random (not initial) weights everywhere, saved with save_pretrained."""
    torch.manual_seed(0)
    model = SOURCES[kind]()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.eval().save_pretrained(folder, **save)
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)
    return model


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer):
    """Each kind's model under <root>/<kind>/<framework>/<version> (the way Kaggle lays out an attached model),
    and a small text to train on."""
    root = tmp_path_factory.mktemp("sources")
    (root / "text.txt").write_text(TEXT[:60_000], encoding="utf-8")
    models = {kind: make_source(kind, root / kind / "transformers" / "1", tokenizer) for kind in SOURCES}
    return root, models


def settings(root: Path, kind: str, **changes) -> dict:
    """TINY's training settings (its model shape is the folder's to decide) and model.init_from."""
    chosen = {k: v for k, v in TINY.items() if not k.startswith("model.")}
    chosen.update({"model.init_from": str(root / kind), "model.block_size": 32,
                   "data.text_glob": str(root / "text.txt"), "train.warmup_steps": 2})
    chosen.update({key.replace("__", "."): value for key, value in changes.items()})
    return chosen


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(SOURCES))
def test_zero_steps_give_the_source_logits_through_our_model_and_the_export(tmp_path, sources, tokenizer, kind):
    root, models = sources
    summary = run(resolve_config("configs/llm_cpu.yaml", settings(root, kind, train__max_steps=0)), tmp_path / "run")
    assert summary["steps"] == 0 and summary["val_loss"] < 6.5  # evaluated as it is: zero-shot figures
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / 0.6931471805599453 *
                                               summary["data"]["val_tokens"] / summary["data"]["val_bytes"], rel=1e-3)
    source = models[kind]
    ids = torch.tensor([tokenizer.encode(TEXT[2000:2600])[:48]])  # longer than block_size 32: the model's context
    config, _, ours = load_trained(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])
    assert config.tokenizer.mode == "hf" and config.tokenizer.pretrained_name == str(root / kind / "transformers" / "1")
    expected = logits(source, ids)
    torch.testing.assert_close(logits(ours.eval(), ids), expected, rtol=0, atol=1e-4)
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "hf"), local_files_only=True).eval()
    assert type(exported) is type(source)
    torch.testing.assert_close(logits(exported, ids), expected, rtol=0, atol=1e-4)
    # unchanged: the same tensors, bit for bit, and the config fields that shape them
    before = load_file(str(root / kind / "transformers" / "1" / "model.safetensors"))
    after = load_file(str(tmp_path / "run" / "hf" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    ours_config, theirs_config = exported.config.to_dict(), source.config.to_dict()
    shape_keys = ["vocab_size", "tie_word_embeddings", "n_positions", "n_inner", "layer_norm_epsilon",
                  "num_key_value_heads", "head_dim", "intermediate_size", "rms_norm_eps", "max_position_embeddings"]
    assert {k: ours_config.get(k) for k in shape_keys} == {k: theirs_config.get(k) for k in shape_keys}
    assert ours_config.get("rope_parameters") == theirs_config.get("rope_parameters")


@pytest.mark.slow
def test_a_few_steps_lower_the_validation_loss_and_a_resumed_run_keeps_its_own_weights(tmp_path, sources, capsys):
    root, _ = sources
    config = resolve_config("configs/llm_cpu.yaml", settings(root, "llama", train__max_steps=20, train__eval_interval=10,
                                                          train__checkpoint_interval=10, train__keep_checkpoints=5))
    first = run(config, tmp_path)
    evaluations = [r["val_loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
                   if "val_loss" in r]
    assert evaluations[0] - evaluations[-1] > 1.0 and evaluations == sorted(evaluations, reverse=True)
    assert "starting from" in capsys.readouterr().out
    final = list_checkpoints(tmp_path / "checkpoints")[-1]
    trained = load_checkpoint(final).model
    final.unlink()  # as if the run had died before its last checkpoint
    checksum_path(final).unlink()
    again = run(config, tmp_path)
    assert again["resumed_from"] and again["steps"] == first["steps"] == 20
    assert "starting from" not in capsys.readouterr().out  # the pretrained weights are not loaded over the resume
    resumed = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1]).model
    assert all(torch.equal(trained[k], resumed[k]) for k in trained)  # exactly the straight run's weights
    assert again["val_loss"] == first["val_loss"]


def test_the_folder_decides_the_shape_and_tokenizer_and_an_explicit_other_value_is_an_error(tmp_path, sources):
    root, _ = sources
    config = resolve_config("llm_kaggle_t4.yaml", {"model.init_from": str(root / "qwen3")})  # a preset: 6 x 384, 256
    m = config.model
    assert (m.arch, m.n_layer, m.n_head, m.n_kv_head, m.n_embd, m.head_dim, m.mlp_hidden, m.qk_norm) == (
        "llama", 2, 4, 1, 64, 32, 96, True)
    assert (m.norm_eps, m.rope_theta, m.tie_embeddings, m.max_positions, m.vocab_multiple) == (
        1e-6, 1e6, True, 128, VOCAB)
    assert m.block_size == 128  # the preset's 256 is longer than the model's context
    folder = str(root / "qwen3" / "transformers" / "1")
    assert (config.tokenizer.mode, config.tokenizer.pretrained_name) == ("hf", folder)
    assert resolve_config(None, {"model.init_from": str(root / "qwen3"), "model.n_layer": 2}).model.n_layer == 2  # agrees
    with pytest.raises(ConfigError) as err:
        resolve_config("llm_cpu.yaml", {"model.init_from": str(root / "qwen3"), "model.n_layer": 4,
                                     "tokenizer.mode": "char"})
    assert "model.n_layer: 4 in --set, 2 in the model" in str(err.value)
    assert "tokenizer.mode: 'char' in --set, 'hf' in the model" in str(err.value)
    with pytest.raises(ConfigError, match=r"model.size: 'auto' in --set, '' in the model"):  # no planning either
        resolve_config(None, {"model.init_from": str(root / "qwen3"), "model.size": "auto"})
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"extends: llm_cpu.yaml\nmodel:\n  init_from: {root / 'gpt2'}\n  n_head: 8\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"model.n_head: 8 in {mine}, 4 in the model"):
        resolve_config(str(mine))
    with pytest.raises(ConfigError, match=r"'model.block_size' \(256\) must be <= 'model.max_positions' \(64\)"):
        resolve_config(None, {"model.init_from": str(root / "gpt2"), "model.block_size": 256})


def test_the_model_folder_is_found_below_the_given_one_and_never_guessed(tmp_path, sources, monkeypatch):
    root, _ = sources
    assert resolve_config(None, {"model.init_from": str(root / "llama")}).model.n_kv_head == 2
    with pytest.raises(ConfigError) as err:
        resolve_config(None, {"model.init_from": str(root)})  # three models below it
    assert "3 models match" in str(err.value) and str(root / "gpt2" / "transformers" / "1") in str(err.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no transformers model under"):
        resolve_config(None, {"model.init_from": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="holds config.json but no weights"):
        resolve_config(None, {"model.init_from": str(tmp_path / "config-only")})
    with pytest.raises(ConfigError, match="no such folder.*Add Input > Models"):
        resolve_config(None, {"model.init_from": str(tmp_path / "missing")})
    from huggingface_hub import constants  # a Hub id, offline: one error that says to attach the model
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(ConfigError, match=r"'Qwen/Qwen3-0.6B' is not a folder here.*Hub.*attach the model"):
        resolve_config(None, {"model.init_from": "Qwen/Qwen3-0.6B"})


def test_an_attached_kaggle_model_is_found_by_its_name_in_either_layout(tmp_path, sources, monkeypatch):
    root, _ = sources
    kaggle = tmp_path / "kaggle"
    new_layout = kaggle / "input" / "models" / "qwen-lm" / "qwen-3" / "transformers" / "0.6b" / "1"
    old_layout = kaggle / "input" / "tiny-llama" / "transformers" / "default" / "2"
    shutil.copytree(root / "qwen3" / "transformers" / "1", new_layout)
    shutil.copytree(root / "llama" / "transformers" / "1", old_layout)
    monkeypatch.setenv("KERNEL_KAGGLE_ROOT", str(kaggle))
    for name in ("qwen-3", "Qwen-3", "/kaggle/input/qwen-3", "qwen-3/transformers/0.6b", str(kaggle / "input" / "qwen-3")):
        config = resolve_config(None, {"model.init_from": name})
        assert config.model.qk_norm and config.tokenizer.pretrained_name == str(new_layout), name
    assert resolve_config(None, {"model.init_from": "tiny-llama"}).model.n_kv_head == 2
    with pytest.raises(ConfigError) as err:
        resolve_config(None, {"model.init_from": "transformers"})  # both models' paths hold it
    assert "2 models match" in str(err.value) and str(new_layout) in str(err.value) and str(old_layout) in str(err.value)
    with pytest.raises(ConfigError) as err:
        resolve_config(None, {"model.init_from": "/kaggle/input/qwen-4"})
    assert "no such folder; attached models: " in str(err.value) and str(new_layout) in str(err.value)
    assert HFTokenizer.load("qwen-3").name == str(new_layout)  # tokenizer.pretrained_name finds it the same way


@pytest.mark.parametrize("hf_config, named", [
    (LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024}, rope_theta=5e5), "rope_parameters=.*'llama3'"),
    (LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, attention_bias=True),
     "attention_bias=True"),
    (Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                 use_sliding_window=True, sliding_window=16, max_window_layers=1), "use_sliding_window=True"),
    (MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4),
     "'mistral' model; supported are GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM"),
])
def test_what_the_model_code_cannot_hold_is_refused_naming_it(tmp_path, hf_config, named):
    hf_config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")  # never read: the config is refused first
    with pytest.raises(ConfigError, match=named):
        resolve_config(None, {"model.init_from": str(tmp_path)})


@pytest.mark.parametrize("kind, layout", [("llama", "shards"), ("qwen3", "bin"), ("gpt2", "bin")])
def test_weights_load_from_shards_and_from_pytorch_model_bin(tmp_path, tokenizer, kind, layout):
    folder = tmp_path / "model"
    if layout == "shards":
        source = make_source(kind, folder, tokenizer, max_shard_size="40KB")
        assert len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]) > 3
    else:  # the older format, saved from the base model (names without "model." / "transformer.")
        source = make_source(kind, folder, tokenizer)
        (folder / "model.safetensors").unlink()
        prefix = "model." if kind != "gpt2" else "transformer."
        torch.save({k.removeprefix(prefix): v for k, v in source.state_dict().items()}, folder / "pytorch_model.bin")
    config = resolve_config(None, {"model.init_from": str(folder)})
    model = build_model(config, tokenizer.vocab_size).eval()
    load_hf_weights(model, folder)
    ids = torch.tensor([tokenizer.encode(TEXT[:400])[:40]])
    torch.testing.assert_close(logits(model, ids), logits(source, ids), rtol=0, atol=1e-4)


def test_a_tokenizer_larger_than_the_embedding_and_foreign_tensors_are_errors(tmp_path, tokenizer):
    folder = tmp_path / "model"
    make_source("llama", folder, tokenizer)
    config = resolve_config(None, {"model.init_from": str(folder)})
    with pytest.raises(KernelError, match="fewer than the tokenizer's tokens need"):
        load_hf_weights(build_model(config, VOCAB + 1), folder)  # a tokenizer of 321 tokens for 320 rows
    weights = load_file(str(folder / "model.safetensors"))
    from safetensors.torch import save_file
    save_file({**weights, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, str(folder / "model.safetensors"))
    with pytest.raises(KernelError, match=r"do not fit its config.json: not used: model.layers.0.self_attn.q_proj.b"):
        load_hf_weights(build_model(config, tokenizer.vocab_size), folder)


@pytest.mark.slow
def test_a_model_too_big_for_the_memory_trains_in_smaller_pieces_or_is_refused_before_training(tmp_path, sources,
                                                                                             monkeypatch, tokenizer):
    root, _ = sources
    config = resolve_config("configs/llm_cpu.yaml", settings(root, "qwen3", train__max_steps=4, train__batch_size=8,
                                                              train__grad_accum_steps=2))
    need = lambda micro, ckpt: sum(memory_needed(dataclasses.replace(config, model=dataclasses.replace(
        config.model, gradient_checkpointing=ckpt)), tokenizer.vocab_size, torch.float32, True, micro).values())
    monkeypatch.setattr("kernel.memory.free_memory", lambda device: int(need(4, False) / HEADROOM) + 1)
    summary = run(config, tmp_path / "pieces")  # 8 sequences at a time do not fit, 4 do: 4 x 4, the same 16
    saved = yaml.safe_load((tmp_path / "pieces" / "config.yaml").read_text())["train"]
    assert summary["steps"] == 4 and (saved["batch_size"], saved["grad_accum_steps"]) == (4, 4)
    monkeypatch.setattr("kernel.memory.free_memory", lambda device: need(1, True) // 2)
    with pytest.raises(KernelError) as err:
        run(config, tmp_path / "train")
    message = str(err.value)
    assert message.startswith("the model does not fit cpu: even one sequence per micro-batch") and "per process" in message
    assert "model.block_size (now 32)" in message and "train.max_steps=0 only evaluates" in message
    assert not list_checkpoints(tmp_path / "train" / "checkpoints")  # failed before any step
    zero_shot = resolve_config("configs/llm_cpu.yaml", settings(root, "qwen3", train__max_steps=0))
    assert run(zero_shot, tmp_path / "evaluate")["steps"] == 0  # evaluating the model as it is fits


@pytest.mark.slow
def test_a_checkpoint_from_before_the_new_model_keys_still_resumes(tmp_path, tiny):
    from kernel.checkpoint import save_checkpoint
    run(tiny(train__max_steps=10, train__checkpoint_interval=5), tmp_path)
    path = list_checkpoints(tmp_path / "checkpoints")[-1]
    checkpoint = load_checkpoint(path)
    for key in ("n_kv_head", "head_dim", "mlp_hidden", "norm_eps", "tie_embeddings", "max_positions", "init_from"):
        del checkpoint.config["model"][key]  # as written before these keys existed
    save_checkpoint(checkpoint, path)
    assert run(tiny(train__max_steps=15, train__checkpoint_interval=5), tmp_path)["steps"] == 15
