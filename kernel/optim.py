"""## 13. Learning rate and optimizers

The schedule: a linear warm-up to `train.lr`, then a cosine or a warmup-stable-decay (wsd) curve down to
`train.min_lr`, ending at `train.max_steps` or, with a time budget, when the budget does, whichever comes
first. The optimizer: AdamW with weight decay on matrices only, or (`train.optimizer: muon`) Muon for the
blocks' hidden matrices and AdamW for the rest, presented to the loop as one optimizer.
"""

import math

import torch

from kernel.env import KernelError
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


# --- Optimizers ---------------------------------------------------------------------------------------

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
    muon = torch.optim.Muon(matrices, lr=train.lr, weight_decay=train.weight_decay,
                            momentum=train.muon_momentum, adjust_lr_fn="match_rms_adamw")
    return MuonWithAdamW(muon, adamw)


def optimizer_blocker(train: TrainConfig) -> str | None:
    """Why this torch cannot run the chosen optimizer (torch.optim.Muon came in torch 2.9), or None."""
    if train.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        return (f"train.optimizer=muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}: "
                f"upgrade torch, or set train.optimizer=adamw")
    return None


def require_optimizer(train: TrainConfig) -> None:
    """Fail before any data is read, not when the loop starts."""
    reason = optimizer_blocker(train)
    if reason:
        raise KernelError(reason)


def adamw_optimizer(params: list, train: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")  # one kernel for the whole update instead of one per tensor
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=fused)


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
