"""# 7. Training

The loop: AdamW with weight-decay groups, mixed precision chosen by the hardware, gradient accumulation,
a cosine learning-rate schedule with linear warm-up, gradient clipping, periodic evaluation, a JSON-lines
metrics file, and checkpoints that hold everything a resumed run needs (model, optimizer, grad scaler,
step, batch sampler and RNG states, config, tokenizer).

A step is `grad_accum_steps` micro-batches of `batch_size` sequences: the effective batch is their
product, and k micro-batches give the same gradient as one batch k times as large. With several processes
(section 6) each trains on its share of that batch and DistributedDataParallel averages the gradients.
"""

import contextlib
import glob
import hashlib
import io
import json
import math
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kernel.env import KernelError, dtype_name, is_batch_run, is_kaggle, kaggle_root, peak_flops, write_atomic
from kernel.config import Config, TrainConfig, config_to_dict, config_to_yaml
from kernel.data import BatchSampler, TokenData
from kernel.model import GPT, GPTConfig
from kernel.distributed import (Processes, gather_objects, launcher_stop_request, max_across, split_global_batch,
                                sum_across)


# --- Learning rate -------------------------------------------------------------------------------------

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
    decay_steps = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, max((step - train.warmup_steps) / decay_steps, time_progress))
    if train.schedule == "wsd":
        stable = 1.0 - train.decay_fraction
        share = 0.0 if progress <= stable else (progress - stable) / train.decay_fraction
        return train.lr - share * (train.lr - train.min_lr)
    return train.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (train.lr - train.min_lr)


# --- Model, optimizer, precision -----------------------------------------------------------------------

def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """The embedding's row count: the vocabulary rounded up, since matrix shapes that are multiples of 64
    run faster on tensor cores. The extra rows are never targets; sampling and export mask them."""
    return multiple * math.ceil(vocab_size / multiple)


def build_model(config: Config, vocab_size: int) -> GPT:
    m = config.model
    return GPT(GPTConfig(vocab_size=padded_vocab_size(vocab_size, m.vocab_multiple), block_size=m.block_size, n_layer=m.n_layer, n_head=m.n_head,
                         n_embd=m.n_embd, dropout=m.dropout, bias=m.bias,
                         gradient_checkpointing=m.gradient_checkpointing, arch=m.arch, qk_norm=m.qk_norm,
                         rope_theta=m.rope_theta))


def make_optimizer(model: torch.nn.Module, train: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW that decays only matrices (weights of Linear/Embedding), never biases or norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")  # one kernel for the whole update instead of one per tensor
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=fused)


def autocast_context(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def probe_cpu_dtype(config: Config, vocab_size: int, timer=time.perf_counter, steps: int = 3) -> tuple[torch.dtype, str]:
    """On a CPU, bf16 autocast is about twice as fast as fp32 for mid-size models on chips with bf16 matrix
    units (AMX, AVX-512 BF16) but slower for tiny models or elsewhere: time a few training steps of this
    model both ways and keep bf16 only when it is clearly faster."""
    with torch.random.fork_rng(devices=[]):  # the probe must not shift the run's random numbers
        model = build_model(config, vocab_size)
        x = torch.randint(vocab_size, (config.train.batch_size, config.model.block_size))
        seconds = {}
        for dtype in (torch.float32, torch.bfloat16):
            for attempt in range(steps + 1):  # the first step warms up and is not counted
                if attempt == 1:
                    started = timer()
                with autocast_context(torch.device("cpu"), dtype):
                    loss = model(x, x)[1]
                loss.backward()
            seconds[dtype] = timer() - started
    speedup = seconds[torch.float32] / max(seconds[torch.bfloat16], 1e-12)
    if speedup >= 1.1:
        return torch.bfloat16, f"cpu: bf16 autocast measured {speedup:.2f}x faster than fp32 for this model"
    return torch.float32, f"cpu: fp32 (bf16 autocast measured {speedup:.2f}x the speed of fp32 for this model)"


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


# --- Files: metrics and checkpoints --------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl: one JSON object per log or eval step, appended and flushed as the run goes."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


CHECKPOINT_PATTERN = "ckpt_*.pt"


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"ckpt_{step:08d}.pt"


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, oldest step first."""
    return sorted(folder.glob(CHECKPOINT_PATTERN)) if folder.is_dir() else []


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(payload: dict, path: Path) -> None:
    """The checkpoint and, beside it, the SHA-256 of its bytes (written last: no checksum, no checkpoint)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        write_atomic(checksum_path(path), hashlib.sha256(data).hexdigest().encode())
    except OSError as err:
        path.unlink(missing_ok=True)
        previous = [p.name for p in list_checkpoints(path.parent) if p != path]
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:,.1f} MB free there"
        except OSError:
            free = "free space unknown"
        raise KernelError(f"could not write checkpoint {path}: {err.strerror or err}; it needs "
                          f"{len(data) / 2**20:,.1f} MB ({free}). The previous checkpoint "
                          f"{previous[-1] if previous else '(none yet)'} is intact. Free some space or choose "
                          "another output folder (--out)") from None


class CheckpointError(KernelError):
    """A checkpoint file that is incomplete, truncated or corrupted."""


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint whose bytes match its checksum, loaded with weights_only=True (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise KernelError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        raise CheckpointError(f"checkpoint {path} has no checksum file {sidecar.name}: its writing was interrupted")
    if hashlib.sha256(data).hexdigest() != sidecar.read_text().strip():
        raise CheckpointError(f"checkpoint {path} does not match its checksum: it is truncated or corrupted")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from None


def load_newest_valid(candidates: list[Path]) -> tuple[Path, dict]:
    """The newest checkpoint that loads; damaged newer ones are skipped with a warning."""
    problems = []
    for path in reversed(candidates):
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError as err:
            print(f"[resume] warning: {err}; trying the one before it")
            problems.append(str(err))
            continue
        if problems:
            print(f"[resume] warning: resuming from {path.name}, an older checkpoint, because the newer ones are damaged")
        return path, checkpoint
    raise KernelError("no usable checkpoint: " + "; ".join(problems) +
                      ". Set train.resume=never (or another --out) to start a new run")


def attached_checkpoints() -> list[Path]:
    """Checkpoints in the outputs of earlier notebook versions attached as inputs (kernel_sources), in the
    2026 layout (/kaggle/input/notebooks/<owner>/<slug>/...) and the older one (/kaggle/input/<slug>/...)."""
    root = kaggle_root() / "input"
    return sorted(Path(p) for p in glob.glob(str(root / "**" / "checkpoints" / CHECKPOINT_PATTERN), recursive=True))


def find_resume_checkpoint(resume: str, out_dir: Path) -> tuple[Path, dict] | None:
    """train.resume: 'never', 'auto' (the newest valid checkpoint in out_dir or, on Kaggle, in an attached
    earlier version's output), a folder, or a file."""
    if resume == "never":
        return None
    if resume == "auto":
        attached = attached_checkpoints() if is_kaggle() else []
        # by step; at equal steps the output folder's own checkpoint sorts last, so it is tried first
        found = sorted(set(list_checkpoints(out_dir / "checkpoints") + attached), key=lambda p: (p.name, p not in attached))
        return load_newest_valid(found) if found else None
    path = Path(resume)
    if path.is_dir():
        found = list_checkpoints(path) or list_checkpoints(path / "checkpoints")
        if not found:
            raise KernelError(f"train.resume={resume!r}: no {CHECKPOINT_PATTERN} in that folder")
        return load_newest_valid(found)
    if not path.is_file():
        raise KernelError(f"train.resume={resume!r}: no such checkpoint file or folder; "
                          "use 'auto', 'never' or a path to a ckpt_*.pt file")
    return path, load_checkpoint(path)


def restore_process_rng(checkpoint: dict, processes: Processes, seed: int) -> None:
    """Each process's own RNG state when the checkpoint has one for it (same number of processes), else rank
    0's on rank 0 and a fresh seed per rank elsewhere (the RNG only drives dropout; data has its own)."""
    saved = checkpoint.get("process_rngs") or [checkpoint["rng"]]
    if len(saved) == processes.world_size or processes.is_main:
        restore_rng_states(saved[processes.rank if len(saved) == processes.world_size else 0])
    else:
        torch.manual_seed(seed + processes.rank + checkpoint["step"])


def rng_states() -> dict:
    bit_generator, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [bit_generator, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else []}  # this process's GPU


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    bit_generator, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((bit_generator, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():  # older checkpoints hold every visible GPU's state
        torch.cuda.set_rng_state(states["cuda"][min(torch.cuda.current_device(), len(states["cuda"]) - 1)])


# Model settings that may change between a checkpoint and the run resuming it (the weights still fit).
RESUMABLE_MODEL_CHANGES = {"dropout", "gradient_checkpointing"}


def check_resume_compatible(checkpoint: dict, config: Config, path: Path) -> None:
    saved, current = checkpoint["config"]["model"], config_to_dict(config)["model"]
    changed = [k for k in current if k not in RESUMABLE_MODEL_CHANGES and saved.get(k) != current[k]]
    if changed:
        details = ", ".join(f"model.{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise KernelError(f"cannot resume from {path}: the model shape changed ({details}); "
                          "set train.resume=never or choose another --out folder to start a new run")


# --- The loop ------------------------------------------------------------------------------------------

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


def show_progress_bar() -> bool:
    """A live bar where someone watches (a terminal, a notebook in the editor); plain lines in a Kaggle
    Save Version run or a log file, where a bar does not animate and only clutters the log."""
    return not is_batch_run() and (sys.stderr.isatty() or "ipykernel" in sys.modules)


class Progress:
    """tqdm where it animates; otherwise one plain line per `every_s` seconds."""

    def __init__(self, total: int, initial: int, every_s: float = 30.0, shown: bool = True):
        self.total, self.every_s, self.last_line = total, every_s, time.perf_counter()
        self.bar = (tqdm(total=total, initial=initial, desc="train", unit="step", mininterval=1.0, dynamic_ncols=True)
                    if shown and show_progress_bar() else None)

    def advance(self, step: int, loss: float | None = None, tokens_per_s: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        elif loss is not None and time.perf_counter() - self.last_line >= self.every_s:
            self.last_line = time.perf_counter()
            print(f"[train] step {step:,}/{self.total:,} | loss {loss:.4f} | {tokens_per_s:,.0f} tokens/s", flush=True)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StopRequests:
    """SIGTERM / SIGINT (a platform ending the session, Ctrl-C, a notebook's interrupt) ask the loop to stop
    after the current step, so it can checkpoint and write its outputs instead of dying mid-step."""

    def __init__(self):
        self.signal_name: str | None = None
        self.previous: dict = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self.request)
        return self

    def request(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        print(f"[train] {self.signal_name} received: stopping after this step, then checkpointing", flush=True)

    def reason(self) -> str | None:
        """The signal received here, or the one the multi-process launcher passed on, or None."""
        return self.signal_name or launcher_stop_request()

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def smaller_micro_batch(micro: int, accum: int) -> tuple[int, int]:
    """After an out-of-memory error: the largest micro-batch <= half the current one that divides it, with the
    accumulation that keeps micro x accumulation (the effective batch) unchanged."""
    smaller = next(d for d in range(micro // 2, 0, -1) if micro % d == 0)
    return smaller, accum * (micro // smaller)


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


def train(config: Config, data: TokenData, out_dir: Path, device: torch.device, dtype: torch.dtype,
          checkpoint: dict | None = None, checkpoint_source: Path | None = None,
          deadline: float | None = None, processes: Processes = Processes()) -> TrainResult:
    """Train to train.max_steps, or until `deadline` (a time.perf_counter() value) leaves just enough time to
    evaluate, checkpoint and sample, or until a stop signal. Every process calls it; only rank 0 writes."""
    t, m = config.train, config.model
    main_process, world = processes.is_main, processes.world_size
    started = time.perf_counter()
    finish_s = {"eval": 0.0, "save": 0.0}  # the longest evaluation and checkpoint so far: the time to finish
    ckpt_dir, metrics = out_dir / "checkpoints", MetricsLog(out_dir / "metrics.jsonl")

    model = build_model(config, data.tokenizer.vocab_size).to(device)
    optimizer = make_optimizer(model, t, device)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    sampler = BatchSampler(data.train, m.block_size, t.batch_size, t.seed)  # the same stream on every process
    global_batch = t.batch_size * t.grad_accum_steps  # sequences per optimizer step, over all processes
    share = global_batch // world
    micro, accum = split_global_batch(t.batch_size, t.grad_accum_steps, world)  # this process's share
    t = replace(t, batch_size=micro, grad_accum_steps=accum)
    step, tokens, last_eval, train_loss, best, history = 0, 0, {}, float("nan"), {}, []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        sampler.load_state_dict(checkpoint["sampler"])
        restore_process_rng(checkpoint, processes, t.seed)
        step, tokens, last_eval = checkpoint["step"], checkpoint["tokens"], checkpoint["last_eval"]
        train_loss, best, history = checkpoint["train_loss"], checkpoint["best"], list(checkpoint["metrics"])
        print(f"[train] resumed from {checkpoint_source} at step {step:,} ({tokens:,} tokens)")
        # An out-of-memory retry shrank the micro-batch: keep what fit while each process's share is the same.
        same_share = (checkpoint.get("world_size", 1) == world
                      and checkpoint["micro_batch"] * checkpoint["grad_accum_steps"] == share)
        if same_share and checkpoint["micro_batch"] != t.batch_size:
            t = replace(t, batch_size=checkpoint["micro_batch"], grad_accum_steps=checkpoint["grad_accum_steps"])
            print(f"[train] micro-batch {t.batch_size} x {t.grad_accum_steps} accumulation, as when it was saved")
    if processes.distributed:
        print(f"[dist] {world} processes, each {t.batch_size} x {t.grad_accum_steps} accumulation of the global "
              f"batch of {global_batch} sequences")
    # The metrics file always restarts from what the checkpoint knew: steps after it are replayed.
    if main_process:
        write_atomic(metrics.path, "".join(json.dumps(r) + "\n" for r in history))
    evaluator = maybe_compile(model, t.compile, device)
    runner = evaluator
    if processes.distributed:  # averages the gradients across processes during the last backward of a step
        runner = torch.nn.parallel.DistributedDataParallel(
            evaluator, device_ids=[device.index] if device.type == "cuda" else None)
    runner.train()

    def record(entry: dict) -> None:
        history.append(entry)
        if main_process:
            metrics.append(entry)

    def save(at_step: int) -> None:
        nonlocal best
        evaluated = last_eval if last_eval.get("step") == at_step else {}
        if evaluated and (not best or evaluated["val_loss"] < best["val_loss"]):
            best = {"step": at_step, "val_loss": evaluated["val_loss"]}
        process_rngs = gather_objects(processes, rng_states())  # every process's dropout RNG, for exact resumes
        if not main_process:
            return
        payload = {"format": 2, "step": at_step, "tokens": tokens, "last_eval": last_eval, "train_loss": train_loss,
                   "best": best, "metrics": history, "dtype": dtype_name(dtype),
                   "micro_batch": t.batch_size, "grad_accum_steps": t.grad_accum_steps, "world_size": world,
                   "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scaler": scaler.state_dict(), "sampler": sampler.state_dict(), "rng": process_rngs[0],
                   "process_rngs": process_rngs, "config": config_to_dict(config), "tokenizer": data.tokenizer.to_dict()}
        path = checkpoint_path(ckpt_dir, at_step)
        save_started = time.perf_counter()
        save_checkpoint(payload, path)
        finish_s["save"] = max(finish_s["save"], time.perf_counter() - save_started)
        write_atomic(ckpt_dir / "config.yaml", config_to_yaml(config))
        keep = set(list_checkpoints(ckpt_dir)[-t.keep_checkpoints:])
        if best:
            keep.add(checkpoint_path(ckpt_dir, best["step"]))
        for old in list_checkpoints(ckpt_dir):
            if old not in keep:
                old.unlink()
                checksum_path(old).unlink(missing_ok=True)

    def run_eval(at_step: int) -> dict:
        eval_started = time.perf_counter()
        result = evaluate(evaluator, data, config, device, dtype, processes)
        finish_s["eval"] = max(finish_s["eval"], time.perf_counter() - eval_started)
        entry = {"step": at_step, "tokens": tokens, **result, "elapsed_s": round(time.perf_counter() - started, 3)}
        record(entry)
        progress.write(f"[eval] step {at_step:,}: train {result['eval_train_loss']:.4f} | val {result['val_loss']:.4f}"
                   f" | ppl {result['val_ppl']:.2f} | bpb {result['val_bpb']:.3f}")
        return entry

    tokens_per_step = global_batch * m.block_size
    peak = peak_flops(device, dtype)
    peak = peak * world if peak else None  # every process's device works on the step
    flops_per_token = model.flops_per_token()
    train_seconds, window_loss, window_steps, window_start = 0.0, torch.zeros((), device=device), 0, time.perf_counter()
    start_step, stopped_by, nonfinite_run = step, "max_steps", 0
    progress = Progress(t.max_steps, step, shown=main_process)
    pending_starts = None  # a step's sequences, kept while it is retried with a smaller micro-batch
    loop_start = time.perf_counter()
    if step == 0:
        last_eval = run_eval(0)
    with StopRequests() as stop_requests:
        while step < t.max_steps:
            training_ends = None if deadline is None else deadline - (1.5 * (finish_s["eval"] + finish_s["save"]) + 1)
            time_progress, out_of_time = 0.0, False
            if training_ends is not None:  # the share of the time available for training that is used up
                time_progress = (time.perf_counter() - loop_start) / max(1e-9, training_ends - loop_start)
                out_of_time = time.perf_counter() >= training_ends
            # Processes decide together: one process's clock or signal stops all, and all use one schedule.
            out_of_time, signalled, time_progress = max_across(
                processes, [float(out_of_time), float(bool(stop_requests.reason())), time_progress])
            if out_of_time:
                stopped_by = "time_budget"
                progress.write(f"[train] time budget nearly spent at step {step:,}: stopping to evaluate and save")
                break
            if signalled:
                stopped_by = f"signal ({stop_requests.reason() or 'SIGTERM to another process'})"
                break
            lr = lr_at(step, t, time_progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_start = time.perf_counter()
            if pending_starts is None:  # this process's share of the step's sequences
                pending_starts = sampler.draw(global_batch)[processes.rank * share:(processes.rank + 1) * share]
            batches = [sampler.windows(pending_starts[i:i + t.batch_size]) for i in range(0, share, t.batch_size)]
            try:
                loss, loss_finite = train_step(runner, optimizer, scaler, batches, t, device, dtype, processes)
            except torch.cuda.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if t.batch_size == 1 or processes.distributed:  # other processes wait inside this step: no retry
                    progress.close()
                    raise out_of_memory_error(config, t.batch_size, processes.distributed) from None
                micro, accum = smaller_micro_batch(t.batch_size, t.grad_accum_steps)
                progress.write(f"[train] out of memory at micro-batch {t.batch_size}: retrying step {step + 1:,} with "
                           f"micro-batch {micro} x {accum} accumulation (the effective batch is unchanged)")
                t = replace(t, batch_size=micro, grad_accum_steps=accum)
                continue
            pending_starts = None
            nonfinite_run = 0 if loss_finite else nonfinite_run + 1
            if nonfinite_run >= t.nan_patience:
                progress.close()
                raise_nonfinite(t, step + 1, ckpt_dir)
            window_loss += loss
            step, tokens, window_steps = step + 1, tokens + tokens_per_step, window_steps + 1
            train_seconds += time.perf_counter() - step_start
            if step % t.log_interval == 0 or step == t.max_steps:
                train_loss = (window_loss / window_steps).item()
                tokens_per_s = window_steps * tokens_per_step / (time.perf_counter() - window_start)
                record({"step": step, "tokens": tokens, "train_loss": train_loss, "lr": lr,
                        "tokens_per_s": round(tokens_per_s, 1), "elapsed_s": round(time.perf_counter() - started, 3),
                        "mfu": round(flops_per_token * tokens_per_s / peak, 5) if peak else None})
                progress.advance(step, train_loss, tokens_per_s)
                window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()
            else:
                progress.advance(step)
            if step % t.eval_interval == 0 or step == t.max_steps:
                last_eval = run_eval(step)
            if t.checkpoint_interval and step % t.checkpoint_interval == 0 and step != t.max_steps:
                save(step)
        progress.close()
        if window_steps:  # the loop stopped between log steps (time budget, signal)
            train_loss = (window_loss / window_steps).item()
        if last_eval.get("step") != step:
            last_eval = run_eval(step)
        save(step)
    trained_tokens = (step - start_step) * tokens_per_step
    tokens_per_s = trained_tokens / train_seconds if train_seconds else 0.0
    return TrainResult(model=model, step=step, tokens=tokens, last_eval=last_eval, train_loss=train_loss,
                       tokens_per_s=tokens_per_s, mfu=flops_per_token * tokens_per_s / peak if peak else None,
                       wall_s=time.perf_counter() - started, stopped_by=stopped_by,
                       resumed_from=str(checkpoint_source) if checkpoint is not None else None,
                       best=best, history=history)


def raise_nonfinite(t: TrainConfig, step: int, ckpt_dir: Path) -> None:
    saved = list_checkpoints(ckpt_dir)
    raise KernelError(
        f"the training loss was NaN or infinite for {t.nan_patience} consecutive steps (up to step {step:,}); "
        f"the run stopped without saving them. The last good checkpoint is "
        f"{saved[-1] if saved else '(none: no checkpoint was written yet)'}. Try a lower train.lr (now {t.lr:g}), "
        "keep train.grad_clip on, or use train.dtype=bfloat16 or float32 instead of float16")
