"""train.lora_rank: low-rank adapters on a pretrained Llama or Qwen3 (tiny ones made by transformers, as in
tests/test_init_from.py): only the adapters train and are saved, the base stays bit for bit, the export is the
merged model plus a PEFT adapter folder that peft itself loads."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import kernel.main
from kernel.checkpoint import list_checkpoints, load_checkpoint
from kernel.config import ConfigError, lora_projections
from kernel.env import KernelError
from kernel.hf_interop import load_hf_weights
from kernel.lora import LORA_MARK, LoRALinear, add_adapters, check_same_base, merged_state_dict, peft_state_dict
from kernel.main import resolve_config, run
from kernel.model import build_model
from kernel.sample import load_trained
from tests.test_init_from import TEXT, logits, make_source, settings, sources, tokenizer  # noqa: F401 (fixtures)
from tests.test_reliability import metrics_without_timing, state_tensors, wait_for_step

ROOT = Path(__file__).resolve().parent.parent
LORA = {"train__lora_rank": 4, "train__lora_alpha": 8, "train__lr": 1e-2, "train__eval_interval": 10,
        "train__checkpoint_interval": 10, "train__keep_checkpoints": 5}


def folder(root: Path, kind: str) -> Path:
    return root / kind / "transformers" / "1"


def lora_config(root: Path, kind: str, **changes):
    return resolve_config("configs/llm_cpu.yaml", settings(root, kind, **{**LORA, **changes}))


# --- Config ----------------------------------------------------------------------------------------------

def test_lora_needs_a_pretrained_llama_or_qwen3_and_sane_values(sources):
    root, _ = sources
    with pytest.raises(ConfigError, match="needs model.init_from"):
        resolve_config("configs/llm_cpu.yaml", {"train.lora_rank": 8})
    with pytest.raises(ConfigError, match="not GPT-2"):
        resolve_config("configs/llm_cpu.yaml", settings(root, "gpt2", train__lora_rank=8))
    with pytest.raises(ConfigError, match="lora_rank' must be >= 0"):
        resolve_config("configs/llm_cpu.yaml", {"train.lora_rank": -1})
    with pytest.raises(ConfigError, match="lora_targets") as error:
        resolve_config("configs/llm_cpu.yaml", settings(root, "llama", train__lora_rank=8, train__lora_targets="q,x"))
    assert "lora_alpha" not in str(error.value)
    assert lora_projections("attn") == ("q", "k", "v", "o")
    assert lora_projections("v_proj, q") == ("q", "v") and len(lora_projections("attn_mlp")) == 7
    assert resolve_config("configs/llm_cpu.yaml", settings(root, "qwen3", train__lora_rank=8)).train.lora_rank == 8


# --- The adapters in the model ---------------------------------------------------------------------------

def adapted_model(root: Path, kind: str, targets: str = "attn_mlp"):
    config = lora_config(root, kind, train__lora_targets=targets)
    model = build_model(config, 300)
    load_hf_weights(model, folder(root, kind))
    add_adapters(model, config.train)
    return config, model


def test_adapters_start_at_the_base_model_and_merge_to_the_same_logits(sources):
    root, models = sources
    config, model = adapted_model(root, "llama", targets="q,v,down")
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    torch.testing.assert_close(logits(model.eval(), ids), logits(models["llama"], ids), rtol=0, atol=1e-4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(LORA_MARK in n for n in trainable)
    attn = model.transformer.h[0].attn.c_attn
    assert isinstance(attn, LoRALinear) and set(attn.slices) == {"q", "v"}  # k's rows have no adapter
    with torch.no_grad():
        for name, param in model.named_parameters():
            if LORA_MARK in name:
                param.normal_(0, 0.05)
    adapted = logits(model, ids)
    merged = build_model(config, 300).eval()
    merged.load_state_dict(merged_state_dict(model))
    torch.testing.assert_close(logits(merged, ids), adapted, rtol=0, atol=1e-4)
    assert not torch.allclose(adapted, logits(models["llama"], ids), atol=1e-3)
    names = peft_state_dict(model)
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in names
    assert names["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    assert not any("k_proj" in n for n in names)


def test_a_resume_on_other_pretrained_weights_or_adapters_is_refused():
    saved = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q", "v"], "base_fingerprint": "a" * 64}
    check_same_base(saved, dict(saved), "ckpt")
    with pytest.raises(KernelError, match="other pretrained weights"):
        check_same_base(saved, {**saved, "base_fingerprint": "b" * 64}, "ckpt")
    with pytest.raises(KernelError, match="adapters changed .*rank: 4 -> 8"):
        check_same_base(saved, {**saved, "rank": 8}, "ckpt")
    with pytest.raises(KernelError, match="trained with LoRA"):
        check_same_base(saved, {}, "ckpt")
    check_same_base({}, {}, "ckpt")


# --- End to end ------------------------------------------------------------------------------------------

@pytest.fixture
def kept_result(monkeypatch):
    """The run's TrainResult (its model with the adapters), taken where main hands it to the outputs."""
    kept = {}
    original = kernel.main.finish_outputs

    def finish_outputs(config, out_dir, tokenizer, result, *args):
        kept["result"] = result
        return original(config, out_dir, tokenizer, result, *args)

    monkeypatch.setattr(kernel.main, "finish_outputs", finish_outputs)
    return kept


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_lora_trains_only_adapters_and_exports_a_merged_model_and_a_peft_folder(tmp_path, sources, kind, kept_result):
    root, models = sources
    # qwen3 also with gradient checkpointing and accumulation (frozen inputs into checkpointed blocks)
    extra = {"model__gradient_checkpointing": True, "train__grad_accum_steps": 2} if kind == "qwen3" else {}
    summary = run(lora_config(root, kind, train__max_steps=20, **extra), tmp_path)
    assert 0 < summary["params_trainable"] < 0.1 * summary["params"]
    evaluations = [r["val_loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
                   if "val_loss" in r]
    assert evaluations[-1] < evaluations[0] - 0.1  # the loss falls
    model = kept_result["result"].model.eval()
    base = build_model(lora_config(root, kind), 300)
    load_hf_weights(base, folder(root, kind))
    trained = model.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in base.state_dict().items())  # the base, bit for bit
    saved = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert saved.model and all(LORA_MARK in k for k in saved.model) and len(saved.lora["base_fingerprint"]) == 64
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 11, 12]])
    ours = logits(model, ids)
    assert not torch.allclose(ours, logits(models[kind], ids), atol=1e-3)  # the adapters changed something
    _, _, reloaded = load_trained(list_checkpoints(tmp_path / "checkpoints")[-1])  # as sample/export load it
    torch.testing.assert_close(logits(reloaded.eval(), ids), ours, rtol=0, atol=0)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    assert type(merged) is type(models[kind])
    torch.testing.assert_close(logits(merged, ids), ours, rtol=0, atol=1e-4)
    adapter_config = json.loads((tmp_path / "hf-adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    assert adapter_config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    peft = pytest.importorskip("peft")
    source = AutoModelForCausalLM.from_pretrained(str(folder(root, kind)), local_files_only=True)
    with_adapter = peft.PeftModel.from_pretrained(source, str(tmp_path / "hf-adapter")).eval()
    torch.testing.assert_close(logits(with_adapter, ids), logits(merged, ids), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_resume_on_other_pretrained_weights_is_refused(tmp_path, sources):
    root, _ = sources
    base = tmp_path / "base"
    shutil.copytree(root / "llama", base)
    config = resolve_config("configs/llm_cpu.yaml", {**settings(root, "llama", **LORA, train__max_steps=10),
                                                     "model.init_from": str(base)})
    run(config, tmp_path / "run")
    weights = next(base.rglob("model.safetensors"))
    tensors = load_file(str(weights))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 0.01  # a new version of the attached model
    save_file(tensors, str(weights), metadata={"format": "pt"})
    longer = resolve_config("configs/llm_cpu.yaml", {**settings(root, "llama", **LORA, train__max_steps=20),
                                                     "model.init_from": str(base)})
    with pytest.raises(KernelError, match="other pretrained weights"):
        run(longer, tmp_path / "run")


def start_lora_cli(root: Path, out: Path) -> subprocess.Popen:
    values = {**settings(root, "llama", **LORA), "train.max_steps": 40, "train.checkpoint_interval": 5,
              "train.log_interval": 1, "train.lora_dropout": 0.1, "model.dropout": 0.1, "sample.max_new_tokens": 5}
    flags = [part for key, value in values.items() for part in ("--set", f"{key}={value}")]
    return subprocess.Popen([sys.executable, "-m", "kernel", "--config", "configs/llm_cpu.yaml", *flags, "--out",
                             str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_continues_a_lora_run_exactly(tmp_path, sources):
    root, _ = sources
    straight = start_lora_cli(root, tmp_path / "straight")
    output, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, output
    out = tmp_path / "killed"
    for target in (8, 23):
        process = start_lora_cli(root, out)
        wait_for_step(out, target, process, timeout=300)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    final = start_lora_cli(root, out)
    output, _ = final.communicate(timeout=600)
    assert final.returncode == 0, output
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "ckpt_00000040.pt")
    b = load_checkpoint(out / "checkpoints" / "ckpt_00000040.pt")
    assert a.model.keys() == b.model.keys() and all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    states_a, states_b = state_tensors(a.optimizer), state_tensors(b.optimizer)
    assert states_a and states_a.keys() == states_b.keys()
    assert all(torch.equal(states_a[k], states_b[k]) for k in states_a)
    assert metrics_without_timing(out) == metrics_without_timing(tmp_path / "straight")


@pytest.mark.slow
def test_two_processes_train_the_same_adapters_as_one(tmp_path, sources):
    """DDP over a LoRA model (gloo on CPU, launched by the program itself): only the adapters are in its buckets,
    and two processes sharing the global batch follow the one-process run."""
    root, _ = sources
    values = {**settings(root, "llama", **LORA), "train.max_steps": 12, "train.batch_size": 4,
              "train.optimizer": "adamw", "sample.max_new_tokens": 4}
    flags = [part for key, value in values.items() for part in ("--set", f"{key}={value}")]
    for processes in (1, 2):
        done = subprocess.run([sys.executable, "-m", "kernel", "--config", "configs/llm_cpu.yaml", *flags,
                               "--set", f"train.devices={processes}", "--set", "train.device=cpu",
                               "--out", str(tmp_path / f"p{processes}")],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    one, two = (load_checkpoint(tmp_path / f"p{n}" / "checkpoints" / "ckpt_00000012.pt") for n in (1, 2))
    assert two.world_size == 2 and one.model.keys() == two.model.keys()
    assert all(LORA_MARK in name for name in two.model)  # the checkpoint holds the adapters alone
    for name in one.model:
        torch.testing.assert_close(two.model[name], one.model[name], rtol=0, atol=1e-4)
    assert json.loads((tmp_path / "p2" / "summary.json").read_text())["processes"] == 2
