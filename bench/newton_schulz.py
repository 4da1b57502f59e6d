#!/usr/bin/env python3
"""Benchmark: Muon's Newton-Schulz iteration in fp32, bf16 and fp16 on this device (issue 26, item 1).

    python bench/newton_schulz.py [--widths 128,256,384,512] [--repeats 5] [--steps 10] [--device cpu|cuda]
                                  [--threads N]

For the llama CPU preset's block matrices (2 layers: per layer the attention's qkv and output projections and
SwiGLU's three matrices) at several widths: the time of one Newton-Schulz pass over all of them in each dtype
(`kernel.optim.newton_schulz`), and at the preset's own shape the median time of a whole training step
(`kernel.train.train_step`) with Muon iterating in each dtype. Dtypes are interleaved and repeated so that
the machine's load hits each alike; read the ratios (`vs_fp32`), not the absolute times. Also the dtype
`kernel.optim.newton_schulz_dtype` chooses for this device. One JSON line per measurement.
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
from kernel.model import build_model, model_shape  # noqa: E402
from kernel.optim import make_optimizer, newton_schulz, newton_schulz_dtype  # noqa: E402
from kernel.train import train_step  # noqa: E402


def block_matrices(width: int, device: torch.device) -> list[torch.Tensor]:
    """Random stand-ins for the momentum of the preset's hidden matrices at this width."""
    config = load_config("llm_cpu.yaml", {"model.n_embd": width, "model.n_head": max(1, width // 32)})
    model = model_shape(config, vocab_size=65)
    shapes = [p.shape for block in model.transformer.h for p in block.parameters() if p.dim() == 2]
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator).to(device) for shape in shapes]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def pass_seconds(matrices: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    for matrix in matrices:
        newton_schulz(matrix, dtype)
    sync(device)
    return time.perf_counter() - started


def step_seconds(dtype: torch.dtype, device: torch.device, steps: int) -> float:
    """Median time of a training step of the CPU preset with Muon's iteration in `dtype`."""
    config = load_config("llm_cpu.yaml", {"train.device": str(device)})
    torch.manual_seed(0)
    model = build_model(config, vocab_size=65).to(device)
    optimizer = make_optimizer(model, config.train, device)
    optimizer.muon.ns_dtype = dtype
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    tokens = torch.randint(65, (config.train.batch_size, config.model.block_size + 1), device=device)
    times = []
    for step in range(steps + 2):  # two warm-up steps
        sync(device)
        started = time.perf_counter()
        train_step(model, optimizer, scaler, [(tokens[:, :-1], tokens[:, 1:])], config.train, device, torch.float32)
        sync(device)
        if step >= 2:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def usable_dtypes(device: torch.device) -> list[torch.dtype]:
    """fp32 and bf16; fp16 on a GPU (a CPU runs fp16 matmuls 15-30x slower than fp32: never a choice there)."""
    return [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])


def report(kind: str, width: int, seconds: dict) -> None:
    best = {str(d).removeprefix("torch."): min(times) for d, times in seconds.items()}
    print(json.dumps({"measure": kind, "n_embd": width, **{f"{d}_ms": round(s * 1e3, 2) for d, s in best.items()},
                      **{f"{d}_vs_fp32": round(s / best["float32"], 2) for d, s in best.items() if d != "float32"}}),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--widths", default="128,256,384,512")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default); 1 on a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = usable_dtypes(device)
    print(json.dumps({"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "chosen": " ".join(map(str, newton_schulz_dtype(device)))}), flush=True)
    for width in map(int, args.widths.split(",")):
        matrices = block_matrices(width, device)
        seconds = {dtype: [] for dtype in dtypes}
        for _ in range(args.repeats + 1):  # interleaved; the first round warms up each dtype's kernels
            for dtype in dtypes:
                seconds[dtype].append(pass_seconds(matrices, dtype, device))
        report("newton_schulz_pass", width, {d: times[1:] for d, times in seconds.items()})
    seconds = {dtype: [] for dtype in dtypes}
    for _ in range(max(1, args.repeats // 2)):
        for dtype in dtypes:
            seconds[dtype].append(step_seconds(dtype, device, args.steps))
    report("train_step_cpu_preset", 128, seconds)


if __name__ == "__main__":
    main()
