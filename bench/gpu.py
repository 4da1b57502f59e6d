#!/usr/bin/env python3
"""Benchmark: training throughput, MFU, memory and attention kernels on one GPU (issues 6 and 26).

    python bench/gpu.py [--config llm_base.yaml] [--shape gpt2-small|preset] [--arch gpt2|llama] [--batch N]
                        [--steps 20] [--warmup 5] [--settings bf16,bf16+compile,fp16,fp16+compile,bf16+muon]
    python bench/gpu.py --config llm_kaggle_t4.yaml --shape preset --sdpa        # which attention kernel runs
    python bench/gpu.py --config llm_kaggle_t4.yaml --plan 1800 --plan-tokens 1e8  # model.size=auto's choice
    python bench/gpu.py --smoke [--arch llama]   # a tiny shape on the CPU, to check the script itself

Shapes: `gpt2-small` is GPT-2 small (12 layers x 768, 12 heads, context 1024, batch 16; with `--arch llama`
the same shape as Llama), `preset` the config's own model and batch (`llm_kaggle_t4.yaml`: llama 6 x 384,
context 256, batch 64). The vocabulary is GPT-2's 50,257 (padded to 50,304).

A setting is a dtype (`bf16`, `fp16` with a grad scaler, `fp32`) with `+compile` (torch.compile) and/or
`+muon` (train.optimizer=muon, Newton-Schulz in the device's format; its share of the step is timed). Every
setting runs in this one process on the same random batch through the trainer's own `kernel.train.train_step`
(forward, backward, unscale, clip, the optimizer). Warm-up steps (compilation included: `first_step_s`) are not
timed; then the median of --steps timed steps, each ended by a device synchronisation. MFU = model FLOPs per
token (`GPT.flops_per_token`) x tokens/s / the data-sheet dense peak (`kernel.env.peak_flops`). The memory
estimate (`kernel.memory.memory_needed`, what a run checks before it builds the model) is printed beside
`torch.cuda.max_memory_allocated`. One JSON line per setting.
"""

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernel.config import Config, load_config  # noqa: E402
from kernel.env import DTYPES, describe_environment, peak_flops  # noqa: E402
from kernel.memory import memory_needed  # noqa: E402
from kernel.model import build_model  # noqa: E402
from kernel.optim import make_optimizer, newton_schulz_dtype  # noqa: E402
from kernel.compiling import autocast_context, maybe_compile  # noqa: E402
from kernel.train import train_step

SHAPES = {"gpt2-small": {"model.n_layer": 12, "model.n_head": 12, "model.n_embd": 768, "model.block_size": 1024,
                         "train.batch_size": 16},
          "smoke": {"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 64, "model.block_size": 64,
                    "train.batch_size": 4},
          "preset": {}}
VOCAB = 50257
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def bench_config(args: argparse.Namespace, device: torch.device, **extra) -> Config:
    overrides = {**SHAPES[args.shape], "model.dropout": 0.0, "train.device": str(device), **extra}
    if args.arch:
        overrides["model.arch"] = args.arch
    if args.batch:
        overrides["train.batch_size"] = args.batch
    return load_config(args.config, overrides)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_muon(optimizer, device: torch.device) -> list[float]:
    """Time Muon's part of every optimizer step (synchronised before and after), into the returned list."""
    times, original = [], optimizer.muon.step

    def step(closure=None):
        sync(device)
        started = time.perf_counter()
        original()
        sync(device)
        times.append(time.perf_counter() - started)

    optimizer.muon.step = step
    return times


def measure(setting: str, args: argparse.Namespace, device: torch.device) -> dict:
    parts = setting.split("+")
    dtype, compiled, muon = DTYPES[DTYPE_NAMES[parts[0]]], "compile" in parts, "muon" in parts
    config = bench_config(args, device, **({"train.optimizer": "muon"} if muon else {}))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = build_model(config, VOCAB).to(device)
    runner = maybe_compile(model, compiled, device)
    optimizer = make_optimizer(model, config.train, device)
    muon_times = timed_muon(optimizer, device) if muon else []
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batch, block = config.train.batch_size, config.model.block_size
    tokens = torch.randint(VOCAB, (batch, block + 1), device=device)
    times = []
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        loss, _ = train_step(runner, optimizer, scaler, [(tokens[:, :-1], tokens[:, 1:])], config.train, device, dtype)
        sync(device)
        times.append(time.perf_counter() - started)
    step_s = statistics.median(times[args.warmup:])
    tokens_per_s = batch * block / step_s
    peak = peak_flops(device, dtype)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    estimate = sum(memory_needed(config, VOCAB, dtype, training=True).values()) / 2**30
    result = {"setting": setting, "arch": config.model.arch,
              "shape": f"{config.model.n_layer} x {config.model.n_embd}", "batch": batch, "context": block,
              "params": model.num_params(), "tokens_per_s": round(tokens_per_s), "step_ms": round(1e3 * step_s, 2),
              "mfu": round(model.flops_per_token() * tokens_per_s / peak, 4) if peak else None,
              "first_step_s": round(times[0], 2), "loss": round(loss.item(), 3),
              "peak_memory_gib": round(memory, 2) if memory else None, "memory_estimate_gib": round(estimate, 2)}
    if muon:
        muon_s = statistics.median(muon_times[args.warmup:])
        result.update({"newton_schulz": str(optimizer.muon.ns_dtype).removeprefix("torch."),
                       "muon_ms": round(1e3 * muon_s, 2), "muon_share_of_step": round(muon_s / step_s, 3)})
    return result


def forward_backward(model, tokens: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
    with autocast_context(device, dtype):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()


def sdpa_report(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """Which attention kernel scaled_dot_product_attention ran for this model (the aten op the profiler saw
    in one training forward and backward), which backends are enabled, and which can run this shape at all."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    config = bench_config(args, device)
    model = build_model(config, VOCAB).to(device)
    tokens = torch.randint(VOCAB, (config.train.batch_size, config.model.block_size + 1), device=device)
    forward_backward(model, tokens, device, dtype)  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        forward_backward(model, tokens, device, dtype)
        sync(device)
    ran = sorted({e.key for e in profiled.key_averages() if "scaled_dot_product" in e.key or "_efficient_attention" in
                  e.key or "_flash_attention" in e.key or "cudnn_attention" in e.key})
    enabled = {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")()
               for name in ("flash", "mem_efficient", "cudnn", "math") if hasattr(torch.backends.cuda, f"{name}_sdp_enabled")}
    runs = {}
    for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        try:
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                forward_backward(model, tokens, device, dtype)
                sync(device)
            runs[backend] = "runs"
        except RuntimeError as err:
            runs[backend] = f"cannot: {str(err).strip().splitlines()[0][:120]}"
    return {"sdpa": {"dtype": str(dtype).removeprefix("torch."), "shape": f"batch {config.train.batch_size}, "
                     f"{config.model.n_head} heads x {config.model.n_embd // config.model.n_head}, "
                     f"context {config.model.block_size}", "ops_that_ran": ran, "enabled": enabled, "backends": runs}}


def plan_report(args: argparse.Namespace, device: torch.device) -> str:
    """model.size=auto for --plan seconds on --plan-tokens unique tokens of a BPE-sized vocabulary, measured on
    this device: the planner's own report (kernel.plan.plan_model, as a run prints it)."""
    from kernel.plan import plan_model
    config = load_config(args.config, {"model.size": "auto", "train.device": str(device)})
    with tempfile.TemporaryDirectory():
        plan = plan_model(config, args.plan_vocab, int(args.plan_tokens), args.plan, device)
    return plan.report() + "\n" + json.dumps({"plan": plan.to_dict()})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="llm_base.yaml", help="a preset or YAML file (default: llm_base.yaml)")
    parser.add_argument("--shape", default="gpt2-small", choices=["gpt2-small", "preset"])
    parser.add_argument("--arch", choices=["gpt2", "llama"], help="model.arch (default: the config's)")
    parser.add_argument("--batch", type=int, default=0, help="sequences per step (default: the shape's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--settings", default="bf16,bf16+compile,fp16,fp16+compile")
    parser.add_argument("--sdpa", action="store_true", help="report the attention kernels instead")
    parser.add_argument("--plan", type=float, default=0, help="report model.size=auto's plan for this many seconds")
    parser.add_argument("--plan-tokens", type=float, default=1e8, help="the plan's unique corpus tokens")
    parser.add_argument("--plan-vocab", type=int, default=8192, help="the plan's vocabulary (bpe_simple's default)")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (checks the script only)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        args.shape, args.steps, args.warmup = "smoke", min(args.steps, 3), min(args.warmup, 1)
    else:
        torch.set_float32_matmul_precision("high")  # what autocast leaves in fp32 uses TF32, as a run does
        gpu = describe_environment()["gpus"][0]
        print(json.dumps({"gpu": gpu, "torch": torch.__version__,
                          "newton_schulz": " ".join(map(str, newton_schulz_dtype(device)))}), flush=True)
    half = torch.bfloat16 if device.type == "cpu" or torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if args.sdpa:
        print(json.dumps(sdpa_report(args, device, half)), flush=True)
        return
    if args.plan:
        print(plan_report(args, device), flush=True)
        return
    for setting in args.settings.split(","):
        if args.smoke and (setting.startswith("fp16") or "compile" in setting):
            continue  # fp16 with a grad scaler is a GPU setting; compiling takes minutes on a CPU
        print(json.dumps(measure(setting, args, device)), flush=True)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
