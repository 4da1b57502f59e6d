#!/usr/bin/env python3
"""Benchmark: training throughput at 6 layers x 384 width, context 256, batch 8 (issue 6, item 2).

    python bench/throughput.py [--steps 6]

Every setting runs in this one process on the same random batch: a full training step (forward, backward,
clip, fused AdamW update) through `kernel.train.train_step`, two warm-up steps, then the median of --steps
timed steps. The baseline is the `gpt2` preset in fp32 (nanoGPT's setting); the ratio column is each
setting's tokens/s over the baseline's.
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

SETTINGS = [  # (label, overrides, autocast dtype)
    ("gpt2 fp32 (baseline)", {}, torch.float32),
    ("gpt2 bf16 autocast", {}, torch.bfloat16),
    ("llama fp32", {"model.arch": "llama"}, torch.float32),
    ("llama bf16 autocast", {"model.arch": "llama"}, torch.bfloat16),
]
SHAPE = {"model.n_layer": 6, "model.n_head": 6, "model.n_embd": 384, "model.block_size": 256,
         "train.batch_size": 8, "model.dropout": 0.0, "train.device": "cpu"}


def tokens_per_second(overrides: dict, dtype: torch.dtype, steps: int) -> float:
    config = load_config("llm_base.yaml", {**SHAPE, **overrides})
    torch.manual_seed(0)
    model = build_model(config, vocab_size=65)  # character-level Shakespeare's vocabulary
    optimizer = make_optimizer(model, config.train, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = torch.randint(65, (8, 257))
    times = []
    for step in range(steps + 2):
        started = time.perf_counter()
        train_step(model, optimizer, scaler, [(batch[:, :-1], batch[:, 1:])], config.train, torch.device("cpu"), dtype)
        if step >= 2:
            times.append(time.perf_counter() - started)
    return 8 * 256 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    results = [(label, tokens_per_second(overrides, dtype, args.steps)) for label, overrides, dtype in SETTINGS]
    baseline = results[0][1]
    for label, rate in results:
        print(json.dumps({"setting": label, "tokens_per_s": round(rate), "vs_baseline": round(rate / baseline, 2)}))


if __name__ == "__main__":
    main()
