"""## 14. Will it fit? Memory, estimated before anything is built

A run that cannot fit should fail in seconds with advice, not an hour into training. The estimate counts
the weights, their gradients and the optimizer's state, the activations a micro-batch keeps for the
backward pass and the logits, and compares the total with what the device has free.
"""

from pathlib import Path

import torch

from kernel.env import KernelError
from kernel.config import Config
from kernel.model import build_model


def free_memory(device: torch.device) -> int | None:
    """Bytes the device can still give: free GPU memory, or the RAM Linux calls available; None: unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            lines = Path("/proc/meminfo").read_text().splitlines()
        except OSError:
            return None
        return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:")), None)
    return None


def memory_needed(config: Config, vocab_size: int, dtype: torch.dtype, training: bool) -> dict[str, int]:
    """A rough estimate of a run's peak memory, in bytes, by what holds it. The fp32 weights (and their
    half-precision copies under autocast); to train, also their gradients, the optimizer's two moments and
    the activations a micro-batch keeps for the backward pass (per layer and token about 12 x width + 4 x the
    MLP's width; with gradient checkpointing one layer's, plus every layer's input); in any case the logits
    of a micro-batch (with their fp32 copy, and to train their log-softmax and gradient)."""
    with torch.device("meta"):  # the exact shape, without allocating it
        model = build_model(config, vocab_size)
    c, params, width = model.config, model.num_params(), torch.finfo(dtype).bits // 8  # bytes per activation
    tokens = config.train.batch_size * config.model.block_size
    layer = tokens * width * (12 * c.n_embd + 4 * c.mlp_hidden)
    needed = {"weights": params * (4 + (width if width < 4 else 0))}
    if training:
        kept = layer + tokens * width * c.n_embd * c.n_layer if c.gradient_checkpointing else layer * c.n_layer
        needed.update({"gradients and optimizer state": 12 * params, "activations": kept,
                       "logits": tokens * c.vocab_size * (width + 12)})
    else:
        needed.update({"activations": layer, "logits": tokens * c.vocab_size * (width + 4)})
    return needed


def check_memory(config: Config, vocab_size: int, device: torch.device, dtype: torch.dtype, sharing: int = 1) -> None:
    """Fail before the model is built, with advice, when the estimate exceeds what the device has free (not an
    hour into training). `sharing`: processes that share this memory (several CPU processes share the RAM)."""
    training = config.train.max_steps != 0  # 0: only evaluate the model as it is
    needed = memory_needed(config, vocab_size, dtype, training)
    total, free = sum(needed.values()) * sharing, free_memory(device)
    parts = ", ".join(f"{what} {memory_size(count)}" for what, count in needed.items())
    doing = "training" if training else "evaluating"
    shared = f", x {sharing} processes" if sharing > 1 else ""
    print(f"[memory] {doing} needs about {memory_size(total)} ({parts}{shared}); "
          f"{memory_size(free) if free is not None else 'unknown'} free on {device}")
    if free is not None and total > free:
        raise KernelError(f"the model does not fit: {doing} needs about {memory_size(total)} ({parts}), and {device} "
                          f"has {memory_size(free)} free. {memory_advice(config, device, dtype)}")


def memory_size(count: float) -> str:
    return f"{count / 2**30:,.2f} GB" if count >= 2**30 else f"{count / 2**20:,.1f} MB"


def memory_advice(config: Config, device: torch.device, dtype: torch.dtype) -> str:
    m, t = config.model, config.train
    advice = [f"lower train.batch_size (now {t.batch_size}; raise train.grad_accum_steps to keep the batch) or "
              f"model.block_size (now {m.block_size}): both shrink the activations and the logits"]
    if not m.gradient_checkpointing:
        advice.append("set model.gradient_checkpointing=true (it keeps one layer's activations, not all)")
    if device.type == "cuda" and dtype == torch.float32:
        advice.append("train.dtype=bfloat16 (or float16 on a T4) halves the activations")
    advice.append("start from a smaller model (model.init_from)" if m.init_from else
                  "use a smaller model (model.n_layer, model.n_embd)")
    return "Either " + "; or ".join(advice)
