"""## 15. Learning rate and optimizers

The schedule: a linear warm-up to `train.lr`, then a cosine or a warmup-stable-decay (wsd) curve down to
`train.min_lr`, ending at `train.max_steps` or, with a time budget, when the budget does, whichever comes
first. The optimizer: AdamW with weight decay on matrices only, or (`train.optimizer: muon`) Muon for the
blocks' hidden matrices and AdamW for the rest, presented to the loop as one optimizer. Muon's Newton-Schulz
iteration runs in the number format that is fast on the device: fp32 on most CPUs, bf16 on recent GPUs,
fp16 on a T4.
"""

import inspect
import math

import torch

from kernel.env import cpu_has_native_bf16, dtype_name
from kernel.config import TrainConfig
from kernel.model import GPT
from kernel.lora import LORA_MARK


# --- Learning rate -------------------------------------------------------------------------------------

def step_limit(train: TrainConfig) -> float:
    """train.max_steps as a number: `auto` has none (the time budget ends the run)."""
    return math.inf if train.max_steps == "auto" else train.max_steps


def schedule_progress(step: int, train: TrainConfig, time_progress: float) -> tuple[float, bool]:
    """(how far the decay's clock has run, 0..1; whether the time budget rather than the step count drives it)."""
    by_steps = (step - train.warmup_steps) / max(1, step_limit(train) - train.warmup_steps)
    return min(1.0, max(by_steps, time_progress)), time_progress > by_steps


def lr_at(step: int, train: TrainConfig, time_progress: float = 0.0) -> float:
    """Linear warm-up to train.lr over warmup_steps, then the decay to min_lr, which ends at max_steps or, with
    a time budget, when the budget does (time_progress: the share of the training time used, 0..1),
    whichever comes first.

    cosine: a half cosine from lr to min_lr. wsd (warmup-stable-decay): lr until the last
    train.decay_fraction of the run, then a linear decay to min_lr; it suits runs whose length is set by a
    clock rather than a step count, since most of the run is spent at the peak rate.
    """
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress, _ = schedule_progress(step, train, time_progress)
    if train.schedule == "wsd":
        stable = 1.0 - train.decay_fraction
        share = 0.0 if progress <= stable else (progress - stable) / train.decay_fraction
        return train.lr - share * (train.lr - train.min_lr)
    return train.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (train.lr - train.min_lr)


def wsd_phase(step: int, train: TrainConfig, time_progress: float) -> str:
    """For checkpoints: 'budget_decay' once a wsd schedule decays because the time budget is running out (a
    new session's budget starts its clock again, so it continues from the last 'stable' checkpoint instead),
    'decay' when the step count drives it, else 'stable' ('' for other schedules)."""
    if train.schedule != "wsd" or step < train.warmup_steps:
        return ""
    progress, by_time = schedule_progress(step, train, time_progress)
    if progress <= 1.0 - train.decay_fraction:
        return "stable"
    return "budget_decay" if by_time else "decay"


# --- Muon's Newton-Schulz iteration, in the device's fast number format --------------------------------

# torch.optim.Muon's quintic iteration (Keller Jordan's coefficients, 5 steps): its checkpoints resume here.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def newton_schulz(matrix: torch.Tensor, dtype: torch.dtype, steps: int = NS_STEPS,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS, eps: float = NS_EPS) -> torch.Tensor:
    """Muon's orthogonalisation of a 2-D update: `steps` quintic Newton-Schulz iterations in `dtype`, the same
    operations as torch.optim.Muon (which always uses bf16). The matrix is divided by its norm in fp32 first
    (so its spectral norm is at most 1 and every product stays within fp16's range, and a tiny momentum does
    not underflow in fp16), then cast; the iteration keeps singular values near 1."""
    a, b, c = coefficients
    exact = torch.float64 if dtype == torch.float64 else torch.float32
    x = matrix.to(exact)
    x = (x / x.norm().clamp(min=eps)).to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # the Gram matrix of the shorter side is the cheaper one
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, polynomial, x, beta=a)
    return x.T if tall else x


def newton_schulz_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """The number format Newton-Schulz runs fastest in on this device, with the reason. Its products are
    plain matmuls, so it follows the hardware's matrix units: bf16 from compute capability 8.0, fp16 on 7.x
    (a T4 has fp16 tensor cores and no bf16: emulated bf16 is slower than fp32), fp32 on older GPUs. On a CPU
    bf16 where it has native bf16 instructions (1.4-2.5x fp32's speed on an AVX512-BF16 EPYC, from width 128
    up), else fp32 (bf16 matmuls are converted there: 2.5x slower than fp32 with AVX-512, 15-30x with AVX2
    only; the CPU preset's whole step 1.3x and 3.6x). BENCHMARKS.md, section 3."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return torch.bfloat16, f"compute capability {major}.{minor} has bf16 tensor cores"
        if major == 7:
            return torch.float16, f"compute capability {major}.{minor} has fp16 tensor cores, no bf16"
        return torch.float32, f"compute capability {major}.{minor}: no tensor cores"
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16, "cpu with native bf16 matrix instructions"
    if device.type == "cpu":
        return torch.float32, "cpu without native bf16: bf16 would be converted, slower than fp32"
    return torch.float32, f"{device.type}: fp32"


def muon_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's learning-rate adjustment: `match_rms_adamw` (Moonshot) scales the orthogonal update
    to AdamW's typical size, so Muon and AdamW share train.lr; `original` is Keller Jordan's."""
    rows, columns = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / columns))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, columns))
    return lr


# --- Optimizers without torch._dynamo ------------------------------------------------------------------

def underneath(method):
    """The function under torch's optimizer decorators (`_disable_dynamo`, `_use_grad_for_differentiable`):
    their first call imports torch._dynamo, about 2 s of every run's time budget on 2 cores, though nothing
    here is compiled. They only hide the optimizer from the compiler (and set no_grad, which `step` below
    does itself)."""
    return inspect.unwrap(method)


class WithoutDynamo:
    """Mixin before a torch optimizer class: the same methods, called without their dynamo wrappers."""

    def add_param_group(self, param_group: dict) -> None:
        underneath(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        underneath(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict:
        return underneath(torch.optim.Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict) -> None:
        underneath(torch.optim.Optimizer.load_state_dict)(self, state_dict)


class AdamW(WithoutDynamo, torch.optim.AdamW):
    """torch.optim.AdamW (fused where it can be), without importing torch._dynamo."""

    @torch.no_grad()
    def step(self, closure=None):
        return underneath(torch.optim.AdamW.step)(self, closure)


class Muon(WithoutDynamo, torch.optim.Optimizer):
    """torch.optim.Muon's update (Nesterov momentum, Newton-Schulz orthogonalisation, decoupled weight decay,
    the adjusted learning rate) with the iteration in `ns_dtype` instead of always bf16. Its state dict is
    torch.optim.Muon's (the same group keys, one `momentum_buffer` per matrix), so checkpoints written with
    either resume with the other; the dtype is the device's, not saved."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float, ns_dtype: torch.dtype,
                 adjust_lr_fn: str = "match_rms_adamw"):
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": True,
                    "ns_coefficients": NS_COEFFICIENTS, "eps": NS_EPS, "ns_steps": NS_STEPS,
                    "adjust_lr_fn": adjust_lr_fn}
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        if any(p.dim() != 2 for group in self.param_groups for p in group["params"]):
            raise ValueError("Muon takes 2-D matrices only")

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            momentum, lr = group["momentum"], group["lr"]
            for param in (p for p in group["params"] if p.grad is not None):
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                update = param.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = newton_schulz(update, self.ns_dtype, group["ns_steps"], group["ns_coefficients"], group["eps"])
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-muon_lr(lr, group["adjust_lr_fn"], param.shape))


# --- The run's optimizer -------------------------------------------------------------------------------

def make_optimizer(model: GPT, train: TrainConfig, device: torch.device):
    """train.optimizer: `adamw`, or `muon`: Muon (momentum orthogonalised by Newton-Schulz) for the blocks'
    hidden matrices and AdamW for the rest (embeddings, head, norm gains, biases), as modded-nanogpt and
    nanochat split them. Weight decay only on matrices. Muon's step is scaled to AdamW's update size
    (`match_rms_adamw`), so both follow train.lr on one schedule. Only weights that train get a state: with
    LoRA that is the adapters, which AdamW updates (as in PEFT and litgpt: orthogonalising a rank-r factor
    on its own is not what Muon was made for), so `muon` with LoRA is AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = ({id(p) for block in model.transformer.h for name, p in block.named_parameters()
               if p.dim() == 2 and LORA_MARK not in name} if train.optimizer == "muon" else set())
    matrices = [p for p in params if id(p) in hidden]
    adamw = adamw_optimizer([p for p in params if id(p) not in hidden], train, device)
    if not matrices:
        return adamw
    ns_dtype, _ = newton_schulz_dtype(device)
    muon = Muon(matrices, lr=train.lr, weight_decay=train.weight_decay, momentum=train.muon_momentum,
                ns_dtype=ns_dtype)
    return MuonWithAdamW(muon, adamw)


def optimizer_line(train: TrainConfig, device: torch.device) -> str:
    """What the run's optimizer is on this device, in one line (the log, check-env)."""
    if train.optimizer != "muon":
        return f"train.optimizer={train.optimizer}"
    dtype, why = newton_schulz_dtype(device)
    return f"train.optimizer=muon: Newton-Schulz in {dtype_name(dtype)} ({why})"


def adamw_optimizer(params: list, train: TrainConfig, device: torch.device) -> AdamW:
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")  # one kernel for the whole update instead of one per tensor
    return AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=fused)


class MuonWithAdamW:
    """Two optimizers that the loop, the grad scaler (which needs `param_groups` and `step`) and checkpoints
    see as one: the learning rate is set on every group, one state dict holds both."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
