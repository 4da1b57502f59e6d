"""## 16. Will it fit? A memory plan before anything is built

A run that cannot fit should fail in seconds with advice, not an hour into training. The plan counts what one
process holds: the weights (and their half-precision copies under autocast), their gradients, the optimizer's
state, DistributedDataParallel's gradient buckets (with several processes), the activations its micro-batch
keeps for the backward pass, the logits, and on a GPU the CUDA context and workspace. Then it chooses the
micro-batch and gradient checkpointing that fit with headroom, keeping the configured global batch
(`train.batch_size x train.grad_accum_steps`): the same training, in smaller pieces. What cannot fit even one
sequence at a time is refused before any weights are read, naming the ways out.

The plan can be asked for a device this machine does not have: `python -m kernel plan --device t4x2` (Kaggle's
two T4s), with a model folder that holds only its `config.json`.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kernel.env import KernelError, half_precision_setting
from kernel.config import Config
from kernel.model import build_model, model_shape
from kernel.lora import add_adapters, count_parameters
from kernel.distributed import split_global_batch


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


def memory_needed(config: Config, vocab_size: int, dtype: torch.dtype, training: bool, micro_batch: int = 0,
                  processes: int = 1, device_type: str = "cpu") -> dict[str, int]:
    """One process's peak memory, in bytes, by what holds it, for a micro-batch of `micro_batch` sequences (0:
    train.batch_size). The fp32 weights (and their half-precision copies under autocast); to train, also their
    gradients, the optimizer's state (AdamW: two moments; Muon: one for the blocks' matrices), with several
    processes DDP's gradient buckets (a copy of the gradients), and the activations a micro-batch keeps for the
    backward pass (ACTIVATIONS_PER_TOKEN per layer; with gradient checkpointing one layer's, plus every layer's
    input); in any case the logits of a micro-batch (with their fp32 copy, and to
    train their log-softmax and gradient); on a GPU the CUDA context and the libraries' workspace."""
    model = model_shape(config, vocab_size)  # the exact shape, without allocating it
    c, params, width = model.config, model.num_params(), torch.finfo(dtype).bits // 8  # bytes per activation
    tokens = (micro_batch or config.train.batch_size) * config.model.block_size
    per_token = ACTIVATIONS_PER_TOKEN[c.arch](c.n_embd, c.mlp_hidden) + (qk_norm_activations(c) if c.qk_norm else 0)
    layer = tokens * width * per_token
    trainable = adapter_parameters(config, vocab_size) if config.train.lora_rank else params
    if config.train.lora_rank:  # the frozen base in the training dtype on a GPU (no fp32 copy), fp32 adapters
        needed = {"weights": params * (width if device_type == "cuda" else 4) + 4 * trainable}
    else:
        needed = {"weights": params * (4 + (width if width < 4 else 0))}
    if training:
        kept = layer + tokens * width * c.n_embd * c.n_layer if c.gradient_checkpointing else layer * c.n_layer
        state = 8 * trainable if config.train.lora_rank else optimizer_bytes(model, config.train.optimizer)
        needed.update({"gradients": 4 * trainable, "optimizer state": state})
        if processes > 1:
            needed["DDP buckets"] = 4 * trainable
        needed.update({"activations": kept, "logits": tokens * c.vocab_size * (width + 12)})
    else:
        needed.update({"activations": layer, "logits": tokens * c.vocab_size * (width + 4)})
    if device_type == "cuda":
        needed["CUDA context and workspace"] = CUDA_CONTEXT_BYTES
    return needed


def adapter_parameters(config: Config, vocab_size: int) -> int:
    """The LoRA adapters' parameters (train.lora_*), counted on a model on the meta device."""
    with torch.device("meta"):
        model = build_model(config, vocab_size)
        add_adapters(model, config.train)
    return count_parameters(model)[0]


# Values one layer keeps per token for the backward pass, by architecture (width, MLP width): measured with
# torch.autograd.graph.saved_tensors_hooks (tests/test_memory.py checks them). SwiGLU keeps its gate and up
# projections and their product; GPT-2's GELU MLP less.
ACTIVATIONS_PER_TOKEN = {"llama": lambda width, mlp: 12 * width + 4 * mlp, "gpt2": lambda width, mlp: 8 * width + 2 * mlp}
def qk_norm_activations(c) -> int:
    """QK-norm (Qwen3) keeps each query and key head's input and its RMS for the backward pass."""
    return (c.n_head + c.n_kv_head) * (c.head_dim + 1)


CUDA_CONTEXT_BYTES = 450 * 2**20  # the CUDA context, cuBLAS and cuDNN workspaces: outside torch's allocator


def optimizer_bytes(model: torch.nn.Module, optimizer: str) -> int:
    """AdamW keeps two fp32 moments per parameter; Muon one momentum for the blocks' matrices (AdamW the rest)."""
    hidden = sum(p.numel() for block in model.transformer.h for p in block.parameters() if p.dim() == 2)
    total = sum(p.numel() for p in model.parameters())
    return 8 * total if optimizer != "muon" else 4 * hidden + 8 * (total - hidden)


# --- The plan: what fits, in which pieces ---------------------------------------------------------------

HEADROOM = 0.9  # of a device's memory a plan fills: the allocator's fragmentation and the unforeseen take the rest


@dataclass(frozen=True)
class DeviceSpec:
    """A device a plan can be made for by name, on a machine without it."""
    description: str
    processes: int          # one per GPU
    memory: int             # bytes per GPU
    dtype: torch.dtype      # what `train.dtype: auto` trains in there
    gpu: str                # its row of env.PEAK_FLOPS
    type: str = "cuda"


NAMED_DEVICES = {
    "t4": DeviceSpec("one T4 (15 GB, fp16)", 1, 15 * 2**30, torch.float16, "T4"),
    "t4x2": DeviceSpec("Kaggle's T4 x2 (15 GB each, fp16)", 2, 15 * 2**30, torch.float16, "T4"),
    "p100": DeviceSpec("a P100 (16 GB, fp32)", 1, 16 * 2**30, torch.float32, "P100"),
    "l4": DeviceSpec("an L4 (22 GB, bf16)", 1, 22 * 2**30, torch.bfloat16, "L4"),
    "a100": DeviceSpec("an A100 (40 GB, bf16)", 1, 39 * 2**30, torch.bfloat16, "A100"),
    "h100": DeviceSpec("an H100 (80 GB, bf16)", 1, 79 * 2**30, torch.bfloat16, "H100"),
}


@dataclass
class MemoryPlan:
    device: str
    processes: int
    capacity: int | None        # bytes one process may use; None: unknown
    micro_batch: int            # sequences per forward and backward pass, per process
    accumulation: int           # micro-batches per optimizer step, per process
    gradient_checkpointing: bool
    needed: dict[str, int] = field(default_factory=dict)  # one process's peak, by what holds it
    changed: bool = False       # the configured micro-batch or checkpointing would not fit

    @property
    def total(self) -> int:
        return sum(self.needed.values())

    def report(self) -> str:
        parts = ", ".join(f"{what} {memory_size(count)}" for what, count in self.needed.items())
        free = f"{memory_size(self.capacity)} per process" if self.capacity is not None else "unknown"
        line = (f"[memory] {self.device}, {self.processes} process(es): each needs about {memory_size(self.total)} "
                f"({parts}); {free}")
        pieces = (f"micro-batch {self.micro_batch} x {self.accumulation} accumulation per process"
                  + (", gradient checkpointing" if self.gradient_checkpointing else ""))
        return line + (f"\n[memory] to fit: {pieces} (the same global batch)" if self.changed else f"; {pieces}")

    def apply(self, config: Config) -> Config:
        """The config training with this plan's pieces: the same global batch, this micro-batch."""
        if not self.changed:
            return config
        global_batch = self.micro_batch * self.accumulation * self.processes
        train = dataclasses.replace(config.train, batch_size=self.micro_batch,
                                    grad_accum_steps=global_batch // self.micro_batch)
        model = dataclasses.replace(config.model, gradient_checkpointing=self.gradient_checkpointing)
        return dataclasses.replace(config, train=train, model=model)


def plan_memory(config: Config, vocab_size: int, dtype: torch.dtype, processes: int, capacity: int | None,
                device_type: str, device: str) -> MemoryPlan:
    """The largest micro-batch (of at least 4 sequences, or the configured one if smaller) that fits without
    gradient checkpointing; else the largest that fits with it; else a smaller one without; else an error.
    `capacity`: the bytes one process may use (None: unknown, the configured pieces are kept)."""
    micro, _ = split_global_batch(config.train.batch_size, config.train.grad_accum_steps, processes)
    share = config.train.batch_size * config.train.grad_accum_steps // processes
    training, configured = config.train.max_steps != 0, config.model.gradient_checkpointing
    sizes = [size for size in range(micro, 0, -1) if share % size == 0]
    small = min(4, micro)
    order = ([(size, configured) for size in sizes if size >= small] + [(size, True) for size in sizes] +
             [(size, configured) for size in sizes if size < small])
    for size, checkpointing in order:
        shaped = dataclasses.replace(config, model=dataclasses.replace(config.model, gradient_checkpointing=checkpointing))
        needed = memory_needed(shaped, vocab_size, dtype, training, size, processes, device_type)
        if capacity is None or sum(needed.values()) <= HEADROOM * capacity:
            return MemoryPlan(device, processes, capacity, size, share // size, checkpointing, needed,
                              changed=(size, checkpointing) != (micro, configured))
    smallest = memory_needed(shaped, vocab_size, dtype, training, 1, processes, device_type)
    raise KernelError(does_not_fit(config, device, capacity, smallest, training))


def does_not_fit(config: Config, device: str, capacity: int, smallest: dict[str, int], training: bool) -> str:
    parts = ", ".join(f"{what} {memory_size(count)}" for what, count in smallest.items())
    ways = []
    if training and config.model.init_from and config.model.arch == "llama" and not config.train.lora_rank:
        ways.append("train.lora_rank=16 (LoRA: the pretrained weights stay frozen in half precision; only small "
                    "adapters get gradients and optimizer state)")
    ways.append(f"a shorter model.block_size (now {config.model.block_size}): activations and logits shrink with it")
    ways.append("a smaller model" + (" to start from (model.init_from)" if config.model.init_from else
                                     " (model.n_layer, model.n_embd)"))
    if training:
        ways.append("train.max_steps=0 only evaluates the model, which needs no gradients or optimizer state")
    return (f"the model does not fit {device}: even one sequence per micro-batch, with gradient checkpointing, "
            f"needs about {memory_size(sum(smallest.values()))} per process ({parts}), of "
            f"{memory_size(capacity)} ({HEADROOM:.0%} of it is used). Ways out: " + "; ".join(ways))


def process_capacity(device: torch.device, processes: int) -> int | None:
    """The bytes one process may use here: processes on a CPU share its RAM; each GPU is one process's."""
    free = free_memory(device)
    return free // processes if free is not None and device.type == "cpu" else free


def fit_to_memory(config: Config, vocab_size: int, device: torch.device, dtype: torch.dtype,
                  processes: int = 1) -> Config:
    """The plan for this machine (processes on a CPU share its RAM; each GPU is one process's), printed; the
    config with the pieces that fit."""
    plan = plan_memory(config, vocab_size, dtype, processes, process_capacity(device, processes), device.type,
                       str(device))
    print(plan.report())
    return plan.apply(config)


def memory_size(count: float) -> str:
    return f"{count / 2**30:,.2f} GB" if count >= 2**30 else f"{count / 2**20:,.1f} MB"


def memory_advice(config: Config, device: torch.device, dtype: torch.dtype) -> str:
    m, t = config.model, config.train
    advice = [f"lower train.batch_size (now {t.batch_size}; raise train.grad_accum_steps to keep the batch) or "
              f"model.block_size (now {m.block_size}): both shrink the activations and the logits"]
    if not m.gradient_checkpointing:
        advice.append("set model.gradient_checkpointing=true (it keeps one layer's activations, not all)")
    half = half_precision_setting(device)
    if half and dtype == torch.float32:
        advice.append(f"{half} halves the activations")
    advice.append("start from a smaller model (model.init_from)" if m.init_from else
                  "use a smaller model (model.n_layer, model.n_embd)")
    return "Either " + "; or ".join(advice)
