#!/usr/bin/env python3
"""Benchmark: where bf16 autocast beats fp32 on this CPU, by model width (issue 16, item 11).

    python bench/cpu_dtype.py [--steps 5] [--repeats 3]

`train.dtype: auto` on a CPU follows a fixed rule (kernel.train.cpu_prefers_bf16) instead of timing the
machine at start, because a timing taken on a busy machine picked different dtypes for the same command.
This script measures the rule's evidence: for the llama preset at several widths (4 layers, the CPU
preset's batch of 16 x 64 tokens and a larger 8 x 256), the median step time in fp32 and in bf16 autocast,
interleaved and repeated so that load affects both alike; the ratio is fp32 time / bf16 time.
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
from kernel.model import build_model  # noqa: E402
from kernel.optim import make_optimizer
from kernel.train import train_step

WIDTHS = [128, 192, 256, 384, 512]
BATCHES = [(16, 64), (8, 256)]  # (sequences, tokens per sequence)


def step_seconds(width: int, batch: int, block: int, dtype: torch.dtype, steps: int) -> float:
    config = load_config("llm_cpu.yaml", {"model.n_layer": 4, "model.n_embd": width, "model.n_head": width // 64,
                                          "model.block_size": block, "train.batch_size": batch})
    torch.manual_seed(0)
    model = build_model(config, vocab_size=65)
    optimizer = make_optimizer(model, config.train, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    tokens = torch.randint(65, (batch, block + 1))
    times = []
    for step in range(steps + 2):  # two warm-up steps
        started = time.perf_counter()
        train_step(model, optimizer, scaler, [(tokens[:, :-1], tokens[:, 1:])], config.train,
                   torch.device("cpu"), dtype)
        if step >= 2:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for batch, block in BATCHES:
        for width in WIDTHS:
            seconds = {torch.float32: [], torch.bfloat16: []}
            for _ in range(args.repeats):  # interleaved: a load spike slows both
                for dtype in seconds:
                    seconds[dtype].append(step_seconds(width, batch, block, dtype, args.steps))
            fp32, bf16 = (min(seconds[d]) for d in (torch.float32, torch.bfloat16))
            print(json.dumps({"batch": f"{batch}x{block}", "n_embd": width, "fp32_ms": round(fp32 * 1e3, 1),
                              "bf16_ms": round(bf16 * 1e3, 1), "bf16_speedup": round(fp32 / bf16, 2)}), flush=True)


if __name__ == "__main__":
    main()
