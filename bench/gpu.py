#!/usr/bin/env python3
"""Benchmark: training throughput and MFU of a GPT-2-124M-shaped model on one GPU (issue 6, item 3).

    python bench/gpu.py [--steps 20] [--batch 16] [--settings bf16,bf16+compile,fp16,fp16+compile]
    python bench/gpu.py --smoke        # a tiny shape on the CPU, to check the script itself

GPT-2 small's shape: 12 layers x 768 width, 12 heads, context 1024, vocabulary 50,257 padded to 50,304.
Every setting runs in this one process on the same random batch, through the trainer's own
`kernel.train.train_step` (forward, backward, unscale, clip, fused AdamW). Warm-up steps (compilation
included) are not timed; then the median of --steps timed steps, each ended by a device synchronisation.
MFU = model FLOPs per token (PaLM's formula, `GPT.flops_per_token`) x tokens/s / the GPU's data-sheet
dense peak for that dtype (`kernel.env.peak_flops`). Prints one JSON line per setting.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernel.config import load_config  # noqa: E402
from kernel.env import DTYPES, describe_environment, peak_flops  # noqa: E402
from kernel.model import build_model  # noqa: E402
from kernel.optim import make_optimizer
from kernel.train import maybe_compile, train_step

GPT2_SMALL = {"model.n_layer": 12, "model.n_head": 12, "model.n_embd": 768, "model.block_size": 1024,
              "model.dropout": 0.0}
SMOKE = {"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 64, "model.block_size": 64, "model.dropout": 0.0}
VOCAB = 50257
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def measure(setting: str, shape: dict, batch: int, steps: int, warmup: int, device: torch.device) -> dict:
    dtype = DTYPES[DTYPE_NAMES[setting.split("+")[0]]]
    compiled = setting.endswith("+compile")
    config = load_config("llm_base.yaml", {**shape, "train.batch_size": batch, "train.device": str(device)})
    torch.manual_seed(0)
    model = build_model(config, VOCAB).to(device)
    runner = maybe_compile(model, compiled, device)
    optimizer = make_optimizer(model, config.train, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    tokens = torch.randint(VOCAB, (batch, config.model.block_size + 1), device=device)
    batches = [(tokens[:, :-1], tokens[:, 1:])]
    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        loss, _ = train_step(runner, optimizer, scaler, batches, config.train, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    tokens_per_s = batch * config.model.block_size / statistics.median(times)
    peak = peak_flops(device, dtype)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    result = {"setting": setting, "tokens_per_s": round(tokens_per_s), "step_ms": round(1000 * statistics.median(times), 1),
              "mfu": round(model.flops_per_token() * tokens_per_s / peak, 4) if peak else None,
              "loss": round(loss.item(), 3), "params": model.num_params(), "batch": batch,
              "context": config.model.block_size, "peak_memory_gib": round(memory, 1) if memory else None}
    del model, runner, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--settings", default="bf16,bf16+compile,fp16,fp16+compile")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (checks the script only)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    shape = SMOKE if args.smoke else GPT2_SMALL
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # what autocast leaves in fp32 uses TF32
        gpu = describe_environment()["gpus"][0]
        print(json.dumps({"gpu": gpu, "torch": torch.__version__}), flush=True)
    for setting in args.settings.split(","):
        if args.smoke and setting.startswith("fp16"):
            continue  # fp16 autocast with a grad scaler is a GPU setting
        print(json.dumps(measure(setting, shape, args.batch, args.steps, args.warmup, device)), flush=True)


if __name__ == "__main__":
    main()
