"""## 18. Mixed precision and compiling

Two ways a step gets faster without changing what it computes (within rounding): autocast runs the matrix
products in the half precision section 1 chose for the hardware, and `torch.compile` fuses the model's small
operations into fewer kernels. Compiling costs time before the first step, so `train.compile: auto` turns it on
only where the time budget (or the number of steps) repays that cost on this kind of device, and says which.
"""

import contextlib
import math
import shutil
import sys
from dataclasses import dataclass

import torch



def autocast_context(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compile_blocker(device: torch.device) -> str | None:
    """Why torch.compile cannot work here, or None when it can."""
    if sys.platform == "win32":
        return "torch.compile is not supported on Windows"
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 7:
        return "Triton needs a GPU of compute capability >= 7.0"
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "no C++ compiler found for the CPU backend"
    if device.type not in ("cpu", "cuda"):
        return f"not supported on {device.type}"
    return None


@dataclass(frozen=True)
class CompileCost:
    """What torch.compile costs once (seconds, the first steps and the first evaluation) and saves after
    (the share of each step's time), on one device type."""
    seconds: float
    step_saving: float


# CPU: measured on 2 cores (NOTES.md: llama at the CPU preset's scale, 23% faster steps, 18 s to compile).
# CUDA: not measured yet (bench/gpu_check.sh prints both for the llama presets); an estimate from llama's
# elementwise work (RMSNorm, RoPE, SwiGLU: 1.2-1.5x) and inductor's usual compile time for a small model.
COMPILE_COSTS = {"cpu": CompileCost(seconds=18.0, step_saving=0.23),
                 "cuda": CompileCost(seconds=60.0, step_saving=0.2)}
ASSUMED_MFU = 0.3  # to estimate a step's time from its FLOPs before any step ran (only compile=auto uses it)
COMPILE_MARGIN = 2.0  # the saving must repay the cost twice: recompiles (evaluation, a smaller micro-batch) cost too


def compile_decision(device_type: str, budget_seconds: float | None, max_steps: float,
                     step_seconds: float | None, costs: dict = COMPILE_COSTS) -> tuple[bool, str]:
    """train.compile=auto: compile when the training time it shortens is worth more than compiling costs, by
    COMPILE_MARGIN. The expected training time is the time budget left, or max_steps x the estimated step
    time when that ends sooner; with neither known, off. A budget-bound run gains when saving x time > cost
    (it loses the compile time, then takes faster steps), as does a step-bound one."""
    cost = costs.get(device_type)
    if cost is None:
        return False, f"no measured compile cost on {device_type}"
    expected = [budget_seconds] if budget_seconds else []
    if math.isfinite(max_steps) and step_seconds:
        expected.append(max_steps * step_seconds)
    if not expected:
        return False, "the training time is unknown (no time budget and no step-time estimate)"
    seconds = min(expected)
    saved = cost.step_saving * seconds
    verdict = (f"about {duration_words(seconds)} of training: faster steps would save ~{saved:.0f}s, compiling "
               f"costs ~{cost.seconds:.0f}s on {device_type}")
    return saved > COMPILE_MARGIN * cost.seconds, verdict


def duration_words(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f}s"


def compile_choice(setting: bool | str, device: torch.device, budget_seconds: float | None, max_steps: float,
                   step_seconds: float | None) -> tuple[bool, str]:
    """(compile?, why) for train.compile = true, false or auto; where torch.compile cannot work, off."""
    if setting is False:
        return False, "train.compile=false"
    blocker = compile_blocker(device)
    if blocker:
        return False, f"train.compile={str(setting).lower()}, but {blocker}"
    if setting is True:
        return True, "train.compile=true"
    wanted, why = compile_decision(device.type, budget_seconds, max_steps, step_seconds)
    return wanted, f"train.compile=auto: {why}"


def maybe_compile(model: torch.nn.Module, enabled: bool, device: torch.device) -> torch.nn.Module:
    """torch.compile(model) when asked and possible (bench/gpu.py; a run decides with compile_choice)."""
    if not enabled:
        return model
    reason = compile_blocker(device)
    if reason:
        print(f"[train] train.compile is on but turned off: {reason}")
        return model
    return torch.compile(model)
