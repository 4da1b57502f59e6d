"""## 9. Training

The loop: AdamW with weight-decay groups (or Muon for the blocks' matrices, `train.optimizer: muon`),
mixed precision chosen by the hardware, gradient accumulation,
a cosine (or warmup-stable-decay) learning-rate schedule with linear warm-up, gradient clipping, periodic
evaluation, a JSON-lines metrics file and checkpoints (section 8).

A step learns from the global batch, `batch_size x grad_accum_steps` sequences: a `BatchPlan` splits it into
each process's share (section 7) and that share into micro-batches whose gradients accumulate, which gives
the same gradient as one big batch. `train()` at the end reads top to bottom: a `Trainer` holds what stays
fixed during a run (model, optimizer, data, files), a `LoopState` what changes (step, tokens, evaluations,
the batch plan), and each phase of a step is one method: stop?, optimizer step, log, evaluate, checkpoint.
"""

import contextlib
import json
import math
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kernel.env import KernelError, dtype_name, is_batch_run, peak_flops, write_atomic
from kernel.config import Config, TrainConfig, config_to_dict, config_to_yaml, find_model_folder
from kernel.data import BatchSampler, TokenData
from kernel.model import GPT, GPTConfig, load_hf_weights
from kernel.distributed import (Processes, gather_objects, launcher_stop_request, max_across, split_global_batch,
                                sum_across)
from kernel.checkpoint import (Checkpoint, checkpoint_path, list_checkpoints, prune_checkpoints, restore_process_rng,
                               rng_states, save_checkpoint)


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


# --- Model, optimizer, precision -----------------------------------------------------------------------

def build_model(config: Config, vocab_size: int) -> GPT:
    return GPT(GPTConfig.from_settings(config.model, vocab_size))


def make_optimizer(model: GPT, train: TrainConfig, device: torch.device):
    """train.optimizer: `adamw`, or `muon`: Muon (momentum orthogonalised by Newton-Schulz) for the blocks'
    hidden matrices and AdamW for the rest (embeddings, head, norm gains, biases), as modded-nanogpt and
    nanochat split them. Weight decay only on matrices. Muon's step is scaled to AdamW's update size
    (`match_rms_adamw`), so both follow train.lr on one schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = ({id(p) for block in model.transformer.h for p in block.parameters() if p.dim() == 2}
              if train.optimizer == "muon" else set())
    adamw = adamw_optimizer([p for p in params if id(p) not in hidden], train, device)
    if not hidden:
        return adamw
    muon = torch.optim.Muon([p for p in params if id(p) in hidden], lr=train.lr, weight_decay=train.weight_decay,
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


def maybe_compile(model: torch.nn.Module, enabled: bool, device: torch.device) -> torch.nn.Module:
    if not enabled:
        return model
    reason = compile_blocker(device)
    if reason:
        print(f"[train] train.compile is on but turned off: {reason}")
        return model
    return torch.compile(model)


# --- Will it fit? Memory, estimated before anything is built ----------------------------------------------

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


# --- One optimizer step --------------------------------------------------------------------------------

def train_step(model, optimizer, scaler, batches: list, train: TrainConfig, device, dtype,
               processes: Processes = Processes()) -> tuple[torch.Tensor, bool]:
    """Accumulate gradients over the micro-batches (this process's share of the step), clip, update.

    Returns the mean loss (over every process) and whether it was finite. A step whose loss or gradients
    are not finite is skipped (the fp16 grad scaler also lowers its scale), so one bad batch never poisons
    the weights. Under DistributedDataParallel the gradients are averaged across processes once, on the last
    micro-batch, so every process sees the same gradients and takes the same decision.
    """
    total = torch.zeros((), device=device)
    for index, (x, y) in enumerate(batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        last = index == len(batches) - 1
        synced = contextlib.nullcontext() if last or not processes.distributed else model.no_sync()
        with synced:
            with autocast_context(device, dtype):
                _, loss = model(x, y)
            scaler.scale(loss / len(batches)).backward()
        total += loss.detach()
    total = sum_across(processes, total / len(batches)) / processes.world_size
    scaler.unscale_(optimizer)  # clip and check the true gradients, not the fp16-scaled ones
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip if train.grad_clip > 0 else math.inf)
    grads_finite, loss_finite = torch.stack([torch.isfinite(norm), torch.isfinite(total)]).tolist()  # one sync
    if scaler.is_enabled():
        scaler.step(optimizer)  # skips the update by itself when the gradients hold inf/NaN
    elif grads_finite and loss_finite:
        optimizer.step()
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total, loss_finite


@torch.no_grad()
def evaluate(model, data: TokenData, config: Config, device, dtype, processes: Processes = Processes()) -> dict:
    """Mean loss over the same eval_batches windows of each split every time, so evaluations compare. With
    several processes each evaluates every world_size-th batch and the sums are added up."""
    model.eval()
    losses = {}
    for split, tokens in (("train", data.train), ("val", data.val)):
        sampler = BatchSampler(tokens, config.model.block_size, config.train.batch_size, config.train.seed + 1)
        total = torch.zeros((), device=device)
        for index in range(config.train.eval_batches):
            x, y = sampler.next_batch()
            if index % processes.world_size == processes.rank:
                with autocast_context(device, dtype):
                    total += model(x.to(device), y.to(device))[1].float()
        losses[split] = sum_across(processes, total).item() / config.train.eval_batches
    model.train()
    val_loss = losses["val"]
    return {"eval_train_loss": losses["train"], "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700)),
            "val_bpb": val_loss / math.log(2) * data.val_tokens_per_byte}


# --- The batch plan ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's sequences are split. The global batch is the same whatever the number of
    processes; each process takes an equal share and feeds it through the model `micro_batch` sequences at a
    time, accumulating the gradients of `accumulation` micro-batches. Only an out-of-memory retry changes it."""
    global_batch: int   # sequences per optimizer step, over all processes (train.batch_size x grad_accum_steps)
    share: int          # this process's sequences per step
    micro_batch: int    # sequences per forward and backward pass
    accumulation: int   # micro-batches per step: micro_batch x accumulation == share

    @classmethod
    def configured(cls, train: TrainConfig, world_size: int) -> "BatchPlan":
        micro, accumulation = split_global_batch(train.batch_size, train.grad_accum_steps, world_size)
        return cls(micro * accumulation * world_size, micro * accumulation, micro, accumulation)

    def with_micro_batch(self, micro: int) -> "BatchPlan":
        return replace(self, micro_batch=micro, accumulation=self.share // micro)

    def halved(self) -> "BatchPlan":
        """After an out-of-memory error: the largest micro-batch <= half the current one that divides it,
        with the accumulation that keeps the share (and so the effective batch) unchanged."""
        return self.with_micro_batch(next(d for d in range(self.micro_batch // 2, 0, -1) if self.micro_batch % d == 0))

    def micro_batches(self, starts: list) -> list:
        """This process's share of the step (its sequences' start positions) cut into micro-batches."""
        return [starts[i:i + self.micro_batch] for i in range(0, self.share, self.micro_batch)]


# --- Around the loop: metrics, progress, the clock, stop requests -----------------------------------------

class MetricsLog:
    """metrics.jsonl: one JSON object per log or eval step, appended and flushed as the run goes."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def show_progress_bar() -> bool:
    """A live bar where someone watches (a terminal, a notebook in the editor); plain lines in a Kaggle
    Save Version run or a log file, where a bar does not animate and only clutters the log."""
    return not is_batch_run() and (sys.stderr.isatty() or "ipykernel" in sys.modules)


class Progress:
    """tqdm where it animates; otherwise one plain line per `every_s` seconds."""

    def __init__(self, total: float, initial: int, every_s: float = 30.0, shown: bool = True):
        self.total = f"/{total:,}" if math.isfinite(total) else ""  # max_steps=auto: the budget ends it
        self.every_s, self.last_line = every_s, time.perf_counter()
        self.bar = (tqdm(total=total if math.isfinite(total) else None, initial=initial, desc="train", unit="step",
                         mininterval=1.0, dynamic_ncols=True) if shown and show_progress_bar() else None)

    def advance(self, step: int, loss: float | None = None, tokens_per_s: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        elif loss is not None and time.perf_counter() - self.last_line >= self.every_s:
            self.last_line = time.perf_counter()
            print(f"[train] step {step:,}{self.total} | loss {loss:.4f} | {tokens_per_s:,.0f} tokens/s", flush=True)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TrainingClock:
    """Time spent in train(), read from `now` (injectable). With a deadline (a `now()` value), training stops
    when what is left is just enough to finish: 1.5 x (the longest evaluation + the longest checkpoint so
    far) + 1 s; the share of the training time used lets the schedule's decay end with the budget."""

    def __init__(self, deadline: float | None, now=time.perf_counter, run_started: float | None = None):
        self.deadline, self.now = deadline, now
        self.started = self.loop_started = now()
        self.run_started = self.started if run_started is None else run_started  # where the budget began
        self.longest = {"eval": 0.0, "save": 0.0}

    def start_loop(self) -> None:
        self.loop_started = self.now()

    @contextlib.contextmanager
    def timing(self, kind: str):
        begun = self.now()
        yield
        self.longest[kind] = max(self.longest[kind], self.now() - begun)

    def training_time_used(self) -> tuple[float, bool]:
        """(share of the time available for training used so far, whether it is all used)."""
        if self.deadline is None:
            return 0.0, False
        training_ends = self.deadline - (1.5 * (self.longest["eval"] + self.longest["save"]) + 1)
        now = self.now()
        return (now - self.loop_started) / max(1e-9, training_ends - self.loop_started), now >= training_ends

    def elapsed(self) -> float:
        return self.now() - self.started


class LossWindow:
    """The training loss summed on the device between two log lines: read back (a host sync) only when logged."""

    def __init__(self, device: torch.device, now):
        self.device, self.now = device, now
        self.reset()

    def reset(self) -> None:
        self.total, self.steps, self.started = torch.zeros((), device=self.device), 0, self.now()

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss
        self.steps += 1

    def mean(self) -> float:
        return (self.total / self.steps).item()

    def state(self) -> dict:
        """For checkpoints: a resumed run's first log line then averages the same steps as a straight run's."""
        return {"sum": self.total.item(), "steps": self.steps}

    def restore(self, state: dict) -> None:
        self.total = torch.tensor(state["sum"], dtype=torch.float32, device=self.device)
        self.steps = state["steps"]

    def tokens_per_s(self, tokens_per_step: int) -> float:
        return self.steps * tokens_per_step / (self.now() - self.started)


class RunStopped(KernelError):
    """A stop signal outside the training loop (data preparation, sampling), where work cannot pause."""

    def __init__(self, signal_name: str, message: str = ""):
        super().__init__(message or f"stopped by {signal_name}")
        self.signal_name = signal_name


class StopRequests:
    """SIGTERM / SIGINT (a platform ending the session, Ctrl-C, a notebook's interrupt). Inside the training
    loop (`between_steps`) they ask it to stop after the current step, so it can checkpoint and write its
    outputs instead of dying mid-step; anywhere else they raise RunStopped at once, which the run turns into
    a clean stop of that phase (half-written files are removed by the code that writes them)."""

    def __init__(self):
        self.signal_name: str | None = None
        self.previous: dict = {}
        self.deferred = False

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self.request)
        return self

    def request(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        if not self.deferred:
            raise RunStopped(self.signal_name)
        print(f"[train] {self.signal_name} received: stopping after this step, then checkpointing", flush=True)

    @contextlib.contextmanager
    def between_steps(self):
        self.deferred = True
        try:
            yield self
        finally:
            self.deferred = False

    def reason(self) -> str | None:
        """The signal received here, or the one the multi-process launcher passed on, or None."""
        return self.signal_name or launcher_stop_request()

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def out_of_memory_error(config: Config, micro: int, distributed: bool) -> KernelError:
    m = config.model
    if distributed:  # processes must take the same steps together, so one cannot retry alone
        return KernelError(
            f"out of GPU memory at a micro-batch of {micro} sequences per process: halve train.batch_size and "
            "double train.grad_accum_steps (the same global batch), or enable model.gradient_checkpointing")
    return KernelError(
        "out of GPU memory even with a micro-batch of 1 sequence: the model does not fit. Enable "
        "model.gradient_checkpointing, or shrink model.block_size (now "
        f"{m.block_size}), model.n_embd ({m.n_embd}) or model.n_layer ({m.n_layer}); on a GPU, "
        "train.dtype=float16/bfloat16 also halves activation memory")


def nonfinite_error(t: TrainConfig, step: int, ckpt_dir: Path) -> KernelError:
    saved = list_checkpoints(ckpt_dir)
    return KernelError(
        f"the training loss was NaN or infinite for {t.nan_patience} consecutive steps (up to step {step:,}); "
        f"the run stopped without saving them. The last good checkpoint is "
        f"{saved[-1] if saved else '(none: no checkpoint was written yet)'}. Try a lower train.lr (now {t.lr:g}), "
        "keep train.grad_clip on, or use train.dtype=bfloat16 or float32 instead of float16")


def is_due(step: int, interval: int, max_steps: float) -> bool:
    """Every `interval` steps, and at the last step."""
    return step % interval == 0 or step == max_steps


# --- The loop ------------------------------------------------------------------------------------------

@dataclass
class LoopState:
    """What changes as the run goes; a checkpoint saves it and a resumed run starts from it."""
    plan: BatchPlan
    step: int = 0
    tokens: int = 0
    train_loss: float = float("nan")                  # the last logged training loss
    last_eval: dict = field(default_factory=dict)     # the last evaluation's metrics line
    best: dict = field(default_factory=dict)          # {"step", "val_loss"} of the best checkpoint kept
    history: list = field(default_factory=list)       # every metrics line so far
    nonfinite_run: int = 0                            # consecutive steps whose loss was NaN or infinite
    train_seconds: float = 0.0                        # time inside optimizer steps (evaluation excluded)
    phase: str = ""                                   # the wsd schedule's phase of this session's last step
    stable_step: int | None = None                    # the newest stable-phase checkpoint's step (kept on disk)


@dataclass
class TrainResult:
    model: GPT
    step: int
    tokens: int
    last_eval: dict
    train_loss: float
    tokens_per_s: float      # training throughput of this process (evaluation excluded)
    wall_s: float            # this process's time in train()
    stopped_by: str          # "max_steps", "time_budget" or "signal (SIGTERM)" / "signal (SIGINT)"
    resumed_from: str | None = None
    best: dict = field(default_factory=dict)  # {"step", "val_loss"} of the best checkpoint kept
    mfu: float | None = None  # model FLOPs utilisation of this process's training
    history: list = field(default_factory=list)


class Trainer:
    """What stays fixed during a run (model, optimizer, sampler, files), and one method per phase of the loop.
    Every process makes one; only rank 0 writes files."""

    def __init__(self, config: Config, data: TokenData, out_dir: Path, device: torch.device, dtype: torch.dtype,
                 processes: Processes, clock: TrainingClock, on_eval=None):
        self.config, self.t, self.data, self.device, self.dtype = config, config.train, data, device, dtype
        self.processes, self.clock = processes, clock
        self.on_eval = on_eval if processes.is_main else None  # called with the metrics history after each eval
        self.ckpt_dir, self.metrics = out_dir / "checkpoints", MetricsLog(out_dir / "metrics.jsonl")
        check_memory(config, data.tokenizer.vocab_size, device, dtype,
                     sharing=processes.world_size if device.type == "cpu" else 1)  # one machine's RAM
        self.model = build_model(config, data.tokenizer.vocab_size).to(device)
        self.optimizer = make_optimizer(self.model, self.t, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
        # The same stream on every process: each step draws the global batch and a process takes its share.
        self.sampler = BatchSampler(data.train, config.model.block_size, self.t.batch_size, self.t.seed)
        self.tokens_per_step = self.t.batch_size * self.t.grad_accum_steps * config.model.block_size
        peak = peak_flops(device, dtype)
        self.peak = peak * processes.world_size if peak else None  # every process's device works on the step
        self.flops_per_token = self.model.flops_per_token()
        self.window = LossWindow(device, clock.now)
        self.evaluator = self.runner = self.model
        self.progress: Progress | None = None

    # --- Restore: a new run, or the state a checkpoint saved --------------------------------------------

    def restore(self, checkpoint: Checkpoint | None, source: Path | None) -> LoopState:
        state = LoopState(plan=BatchPlan.configured(self.t, self.processes.world_size))
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint.model)
            self.optimizer.load_state_dict(checkpoint.optimizer)
            self.scaler.load_state_dict(checkpoint.scaler)
            self.sampler.load_state_dict(checkpoint.sampler)
            restore_process_rng(checkpoint, self.processes, self.t.seed)
            state = LoopState(plan=self.resumed_plan(state.plan, checkpoint), step=checkpoint.step,
                              tokens=checkpoint.tokens, train_loss=checkpoint.train_loss,
                              last_eval=checkpoint.last_eval, best=checkpoint.best, history=list(checkpoint.metrics),
                              stable_step=checkpoint.stable_step)
            self.window.restore(checkpoint.loss_window)
            print(f"[train] resumed from {source} at step {state.step:,} ({state.tokens:,} tokens)")
        elif self.config.model.init_from:  # a new run starts from the pretrained weights; a resumed one has its own
            folder = find_model_folder(self.config.model.init_from)
            print(f"[train] starting from {folder}: {load_hf_weights(self.model, folder)} tensors loaded")
        if self.processes.distributed:
            print(f"[dist] {self.processes.world_size} processes, each {state.plan.micro_batch} x "
                  f"{state.plan.accumulation} accumulation of the global batch of {state.plan.global_batch} sequences")
        if self.processes.is_main:  # the metrics file restarts from what the checkpoint knew: later steps replay
            write_atomic(self.metrics.path, "".join(json.dumps(r) + "\n" for r in state.history))
        self.start_step = state.step
        return state

    @staticmethod
    def resumed_plan(plan: BatchPlan, checkpoint: Checkpoint) -> BatchPlan:
        """An out-of-memory retry shrank the micro-batch: keep what fit while each process's share is the same."""
        same_share = (checkpoint.world_size == plan.global_batch // plan.share
                      and checkpoint.micro_batch * checkpoint.grad_accum_steps == plan.share)
        if not same_share or checkpoint.micro_batch == plan.micro_batch:
            return plan
        print(f"[train] micro-batch {checkpoint.micro_batch} x {checkpoint.grad_accum_steps} accumulation, "
              "as when it was saved")
        return plan.with_micro_batch(checkpoint.micro_batch)

    def prepare(self, state: LoopState) -> None:
        """Compile and wrap the model (after its weights are loaded), start the progress display."""
        self.evaluator = self.runner = maybe_compile(self.model, self.t.compile, self.device)
        if self.processes.distributed:  # averages the gradients across processes in a step's last backward
            self.runner = torch.nn.parallel.DistributedDataParallel(
                self.evaluator, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.runner.train()
        self.window.started = self.clock.now()
        self.progress = Progress(step_limit(self.t), state.step, shown=self.processes.is_main)
        self.clock.start_loop()

    # --- Stop? (the time budget, a signal: every process takes the same decision) ---------------------------

    def stop_reason(self, state: LoopState, stop_requests: StopRequests) -> tuple[str | None, float]:
        """Why to stop before the next step (None: go on), and the share of the training time used, which
        drives the schedule. One process's clock or signal stops all, and all use one schedule."""
        time_used, out_of_time = self.clock.training_time_used()
        out_of_time, signalled, time_used = max_across(
            self.processes, [float(out_of_time), float(bool(stop_requests.reason())), time_used])
        if out_of_time and state.step == self.start_step:
            raise self.budget_spent_in_setup()
        if out_of_time:
            self.progress.write(f"[train] time budget nearly spent at step {state.step:,}: stopping to evaluate and save")
            return "time_budget", time_used
        if signalled:
            return f"signal ({stop_requests.reason() or 'SIGTERM to another process'})", time_used
        return None, time_used

    def budget_spent_in_setup(self) -> KernelError:
        clock = self.clock
        return KernelError(
            f"train.time_budget was used up before the first training step: setup (environment, data, model, the "
            f"first evaluation) took {clock.loop_started - clock.run_started:.1f}s of the "
            f"{clock.deadline - clock.run_started:.1f}s budget, and {1.5 * sum(clock.longest.values()) + 1:.1f}s "
            "are kept to evaluate and save at the end. Raise train.time_budget, or lower train.eval_batches")

    # --- One optimizer step, retried with smaller micro-batches after running out of GPU memory -------------

    def optimizer_step(self, state: LoopState, lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        begun = self.clock.now()
        rank, share = self.processes.rank, state.plan.share
        starts = self.sampler.draw(state.plan.global_batch)[rank * share:(rank + 1) * share]
        while True:
            batches = [self.sampler.windows(part) for part in state.plan.micro_batches(starts)]
            try:
                loss, loss_finite = train_step(self.runner, self.optimizer, self.scaler, batches, self.t,
                                               self.device, self.dtype, self.processes)
                break
            except torch.cuda.OutOfMemoryError:
                state.plan = self.smaller_plan_after_oom(state)
        state.nonfinite_run = 0 if loss_finite else state.nonfinite_run + 1
        if state.nonfinite_run >= self.t.nan_patience:
            raise nonfinite_error(self.t, state.step + 1, self.ckpt_dir)
        state.step, state.tokens = state.step + 1, state.tokens + self.tokens_per_step
        state.train_seconds += self.clock.now() - begun
        return loss

    def smaller_plan_after_oom(self, state: LoopState) -> BatchPlan:
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        micro = state.plan.micro_batch
        if micro == 1 or self.processes.distributed:  # other processes wait inside this step: no retry
            raise out_of_memory_error(self.config, micro, self.processes.distributed) from None
        plan = state.plan.halved()
        self.progress.write(f"[train] out of memory at micro-batch {micro}: retrying step {state.step + 1:,} with "
                            f"micro-batch {plan.micro_batch} x {plan.accumulation} accumulation "
                            "(the effective batch is unchanged)")
        return plan

    # --- Log, evaluate, checkpoint -----------------------------------------------------------------------

    def record(self, state: LoopState, entry: dict) -> None:
        state.history.append(entry)
        if self.processes.is_main:
            self.metrics.append(entry)

    def log(self, state: LoopState, loss: torch.Tensor, lr: float) -> None:
        self.window.add(loss)
        if not is_due(state.step, self.t.log_interval, step_limit(self.t)):
            self.progress.advance(state.step)
            return
        state.train_loss, tokens_per_s = self.window.mean(), self.window.tokens_per_s(self.tokens_per_step)
        self.record(state, {"step": state.step, "tokens": state.tokens, "train_loss": state.train_loss, "lr": lr,
                            "tokens_per_s": round(tokens_per_s, 1), "elapsed_s": round(self.clock.elapsed(), 3),
                            "mfu": round(self.flops_per_token * tokens_per_s / self.peak, 5) if self.peak else None})
        self.progress.advance(state.step, state.train_loss, tokens_per_s)
        self.window.reset()

    def run_eval(self, state: LoopState) -> None:
        with self.clock.timing("eval"):
            result = evaluate(self.evaluator, self.data, self.config, self.device, self.dtype, self.processes)
        state.last_eval = {"step": state.step, "tokens": state.tokens, **result,
                           "elapsed_s": round(self.clock.elapsed(), 3)}
        self.record(state, state.last_eval)
        self.progress.write(f"[eval] step {state.step:,}: train {result['eval_train_loss']:.4f} | val "
                            f"{result['val_loss']:.4f} | ppl {result['val_ppl']:.2f} | bpb {result['val_bpb']:.3f}")
        if self.on_eval is not None:
            self.on_eval(state.history)

    def enter_phase(self, state: LoopState, phase: str) -> None:
        """The first step of a decay that the time budget drives: save the weights it starts from, marked
        'stable', so that a run continued with a new budget goes on from them (see checkpoint.py). A decay
        set by max_steps needs none: a resumed run continues it exactly."""
        if phase == "budget_decay" and state.phase == "stable":
            self.save(state, phase="stable")
        state.phase = phase

    def save(self, state: LoopState, phase: str | None = None) -> None:
        if phase == "stable":
            state.stable_step = state.step
        evaluated = state.last_eval if state.last_eval.get("step") == state.step else {}
        if evaluated and (not state.best or evaluated["val_loss"] < state.best["val_loss"]):
            state.best = {"step": state.step, "val_loss": evaluated["val_loss"]}
        process_rngs = gather_objects(self.processes, rng_states())  # every process's dropout RNG: exact resumes
        if not self.processes.is_main:
            return
        checkpoint = Checkpoint(
            step=state.step, tokens=state.tokens, train_loss=state.train_loss, last_eval=state.last_eval,
            best=state.best, metrics=state.history, dtype=dtype_name(self.dtype),
            micro_batch=state.plan.micro_batch, grad_accum_steps=state.plan.accumulation,
            loss_window=self.window.state(), world_size=self.processes.world_size, process_rngs=process_rngs,
            lr_phase=phase or state.phase, stable_step=state.stable_step,
            config=config_to_dict(self.config),
            tokenizer=self.data.tokenizer.to_dict(), model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), sampler=self.sampler.state_dict())
        with self.clock.timing("save"):
            save_checkpoint(checkpoint, checkpoint_path(self.ckpt_dir, state.step))
        write_atomic(self.ckpt_dir / "config.yaml", config_to_yaml(self.config))
        prune_checkpoints(self.ckpt_dir, self.t.keep_checkpoints, {state.best.get("step"), state.stable_step})

    def finish(self, state: LoopState) -> None:
        """The step the loop stopped at is always evaluated and saved."""
        self.progress.close()
        if self.window.steps:  # the loop stopped between log steps (time budget, signal)
            state.train_loss = self.window.mean()
        if state.last_eval.get("step") != state.step:
            self.run_eval(state)
        self.save(state)

    def result(self, state: LoopState, stopped_by: str, resumed_from: Path | None) -> TrainResult:
        trained_tokens = (state.step - self.start_step) * self.tokens_per_step
        tokens_per_s = trained_tokens / state.train_seconds if state.train_seconds else 0.0
        return TrainResult(model=self.model, step=state.step, tokens=state.tokens, last_eval=state.last_eval,
                           train_loss=state.train_loss, tokens_per_s=tokens_per_s,
                           mfu=self.flops_per_token * tokens_per_s / self.peak if self.peak else None,
                           wall_s=self.clock.elapsed(), stopped_by=stopped_by,
                           resumed_from=str(resumed_from) if resumed_from is not None else None,
                           best=state.best, history=state.history)


def train(config: Config, data: TokenData, out_dir: Path, device: torch.device, dtype: torch.dtype,
          checkpoint: Checkpoint | None = None, checkpoint_source: Path | None = None,
          deadline: float | None = None, processes: Processes = Processes(), now=time.perf_counter,
          on_eval=None, stop_requests: StopRequests | None = None, run_started: float | None = None) -> TrainResult:
    """Train to train.max_steps, or until `deadline` (a `now()` value; the budget counts from `run_started`)
    leaves just enough time to evaluate, checkpoint and sample, or until a stop signal. Every process calls
    it; only rank 0 writes, and calls `on_eval(history)` after each evaluation (e.g. to redraw the curves)."""
    t = config.train
    clock = TrainingClock(deadline, now, run_started)
    trainer = Trainer(config, data, out_dir, device, dtype, processes, clock, on_eval)
    state = trainer.restore(checkpoint, checkpoint_source)
    stopped_by = "max_steps"
    trainer.prepare(state)
    stops = StopRequests() if stop_requests is None else contextlib.nullcontext(stop_requests)
    try:
        with stops as stop_requests, stop_requests.between_steps():
            if state.step == 0:
                trainer.run_eval(state)  # the untrained model: the first point of the curves
            while state.step < step_limit(t):
                # --- stop for the time budget or a signal?
                reason, time_used = trainer.stop_reason(state, stop_requests)
                if reason:
                    stopped_by = reason
                    break
                # --- a wsd schedule about to decay: keep the stable weights (a later session continues them)
                trainer.enter_phase(state, wsd_phase(state.step, t, time_used))
                # --- one optimizer step: forward, backward and update over the global batch
                lr = lr_at(state.step, t, time_used)
                loss = trainer.optimizer_step(state, lr)
                # --- log, evaluate and checkpoint when due
                trainer.log(state, loss, lr)
                if is_due(state.step, t.eval_interval, step_limit(t)):
                    trainer.run_eval(state)
                if t.checkpoint_interval and state.step % t.checkpoint_interval == 0 and state.step != step_limit(t):
                    trainer.save(state)
            # --- the end: evaluate and save the last step
            trainer.finish(state)
    finally:
        trainer.progress.close()
    return trainer.result(state, stopped_by, checkpoint_source if checkpoint is not None else None)
