"""The memory plan: per-process figures checked against what a real model holds, pieces chosen to fit with the
global batch kept, and what cannot fit refused before any weights are read."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernel.config import load_config
from kernel.env import KernelError
from kernel.memory import HEADROOM, NAMED_DEVICES, memory_needed, plan_memory
from kernel.model import build_model
from kernel.optim import make_optimizer

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"model.n_layer": 4, "model.n_embd": 128, "model.block_size": 128, "train.batch_size": 8,
         "train.grad_accum_steps": 1, "train.optimizer": "adamw"}
QWEN3 = {"0.6b": dict(hidden_size=1024, intermediate_size=3072), "1.7b": dict(hidden_size=2048, intermediate_size=6144)}


def config_only_qwen3(folder: Path, size: str) -> Path:
    """A model folder holding only config.json, shaped like Qwen3-0.6B or Qwen3-1.7B: enough to plan."""
    from transformers import Qwen3Config

    Qwen3Config(vocab_size=151936, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
                architectures=["Qwen3ForCausalLM"], **QWEN3[size]).save_pretrained(folder)
    return folder


def saved_for_backward(model, tokens: torch.Tensor) -> int:
    """Bytes of the tensors one forward pass keeps for the backward pass, parameters excluded."""
    saved = {}
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t,
            lambda t: t):
        model(tokens, tokens)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for pointer, n in saved.items() if pointer not in weights)


@pytest.mark.parametrize("arch, qk_norm", [("llama", True), ("llama", False), ("gpt2", False)])
def test_the_estimate_matches_what_a_real_model_holds(arch, qk_norm):
    config = load_config("llm_cpu.yaml", {**SMALL, "model.arch": arch, "model.qk_norm": qk_norm})
    model = build_model(config, 500)
    optimizer = make_optimizer(model, config.train, torch.device("cpu"))
    tokens = torch.randint(500, (8, 128))
    model(tokens, tokens)[1].backward()
    optimizer.step()
    estimate = memory_needed(config, 500, torch.float32, training=True, micro_batch=8)
    tensors = lambda items: sum(t.numel() * t.element_size() for t in items)
    assert estimate["weights"] == tensors(model.parameters())  # exact: fp32 weights, nothing cast under fp32
    assert estimate["gradients"] == tensors(p.grad for p in model.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    assert estimate["optimizer state"] == tensors(state)  # AdamW's two moments
    # what each layer keeps for the backward pass: the difference between 4 and 2 layers, measured and estimated
    two = load_config("llm_cpu.yaml", {**SMALL, "model.arch": arch, "model.qk_norm": qk_norm, "model.n_layer": 2})
    measured = (saved_for_backward(model, tokens) - saved_for_backward(build_model(two, 500), tokens)) / 2
    estimated = (estimate["activations"] - memory_needed(two, 500, torch.float32, True, 8)["activations"]) / 2
    assert measured == pytest.approx(estimated, rel=0.02)


def test_ddp_buckets_and_each_processs_own_micro_batch_are_counted():
    config = load_config("llm_cpu.yaml", {**SMALL, "train.batch_size": 16})
    alone = memory_needed(config, 500, torch.float32, True, micro_batch=16)
    shared = memory_needed(config, 500, torch.float32, True, micro_batch=8, processes=2)
    assert "DDP buckets" not in alone and shared["DDP buckets"] == alone["gradients"]
    assert shared["activations"] * 2 == alone["activations"] and shared["logits"] * 2 == alone["logits"]
    plan = plan_memory(config, 500, torch.float32, 2, capacity=None, device_type="cpu", device="two processes")
    assert (plan.micro_batch, plan.accumulation, plan.changed) == (8, 1, False)  # 16 sequences shared by 2


def test_a_plan_keeps_the_global_batch_and_takes_the_largest_pieces_that_fit():
    config = load_config("llm_cpu.yaml", {**SMALL, "train.batch_size": 24, "train.grad_accum_steps": 2})
    need = lambda micro, ckpt=False: sum(memory_needed(
        load_config("llm_cpu.yaml", {**SMALL, "model.gradient_checkpointing": ckpt}), 500, torch.float32, True,
        micro).values())
    capacity = int(need(8) / HEADROOM) + 1  # 24 and 12 sequences do not fit, 8 do
    plan = plan_memory(config, 500, torch.float32, 1, capacity, "cpu", "this CPU")
    assert (plan.micro_batch, plan.accumulation, plan.gradient_checkpointing, plan.changed) == (8, 6, False, True)
    fitted = plan.apply(config)
    assert fitted.train.batch_size * fitted.train.grad_accum_steps == 48  # the same global batch
    capacity = int(need(4, True) / HEADROOM) + 1  # below 4 sequences without checkpointing: checkpointing first
    assert need(4) > HEADROOM * capacity
    plan = plan_memory(config, 500, torch.float32, 1, capacity, "cpu", "this CPU")
    assert (plan.micro_batch, plan.gradient_checkpointing) == (4, True) and plan.apply(config).model.gradient_checkpointing
    with pytest.raises(KernelError, match=r"does not fit this CPU: even one sequence per micro-batch.*Ways out: a "
                                          r"shorter model.block_size \(now 128\)"):
        plan_memory(config, 500, torch.float32, 1, need(1, True) // 2, "cpu", "this CPU")


def test_t4x2_plans_for_qwen3_shaped_folders_that_hold_only_their_config(tmp_path):
    """Asked on a machine without the GPUs, from config.json alone: Qwen3-0.6B fine-tunes fully on Kaggle's two
    T4s in small pieces; a full fine-tune of Qwen3-1.7B is refused with the ways out, before any weights exist,
    and with LoRA it fits."""
    def plan(size: str, *extra: str) -> subprocess.CompletedProcess:
        folder = tmp_path / size if (tmp_path / size).is_dir() else config_only_qwen3(tmp_path / size, size)
        return subprocess.run([sys.executable, "-m", "kernel", "plan", "--device", "t4x2", "--set",
                               f"model.init_from={folder}", "--set", "train.batch_size=8", "--set",
                               "train.grad_accum_steps=4", "--set", "model.block_size=256", *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    small = plan("0.6b")
    assert small.returncode == 0, small.stderr
    assert "Kaggle's T4 x2 (15 GB each, fp16), 2 process(es): each needs about" in small.stdout
    assert "DDP buckets" in small.stdout and "to fit: micro-batch 1 x 16 accumulation per process" in small.stdout
    large = plan("1.7b")
    assert large.returncode == 2 and large.stderr.startswith("error: the model does not fit Kaggle's T4 x2")
    assert "per process" in large.stderr and "train.lora_rank=16 (LoRA" in large.stderr
    assert not list((tmp_path / "1.7b").glob("*.safetensors"))
    adapted = plan("1.7b", "--set", "train.lora_rank=16")
    assert adapted.returncode == 0, adapted.stderr
    figures = adapted.stdout.splitlines()[-2] if "to fit" in adapted.stdout else adapted.stdout.splitlines()[-1]
    assert "each needs about" in figures and "DDP buckets" in figures
    assert json.loads((tmp_path / "1.7b" / "config.json").read_text())["hidden_size"] == 2048
    assert NAMED_DEVICES["t4x2"].processes == 2
