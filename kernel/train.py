"""# 6. Training

The loop: AdamW with weight-decay groups, mixed precision chosen by the hardware, gradient accumulation,
a cosine learning-rate schedule with linear warm-up, gradient clipping, periodic evaluation, a JSON-lines
metrics file, and checkpoints that hold everything a resumed run needs (model, optimizer, grad scaler,
step, batch sampler and RNG states, config, tokenizer).

A step is `grad_accum_steps` micro-batches of `batch_size` sequences: the effective batch is their
product, and k micro-batches give the same gradient as one batch k times as large.
"""

import contextlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kernel.env import KernelError, dtype_name
from kernel.config import Config, TrainConfig, config_to_dict, config_to_yaml
from kernel.tokenization import write_text_atomic
from kernel.data import BatchSampler, TokenData
from kernel.model import GPT, GPTConfig


# --- Learning rate -------------------------------------------------------------------------------------

def lr_at(step: int, train: TrainConfig) -> float:
    """Linear warm-up to train.lr over warmup_steps, then a cosine decay that reaches min_lr at max_steps."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    decay_steps = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    return train.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (train.lr - train.min_lr)


# --- Model, optimizer, precision -----------------------------------------------------------------------

def build_model(config: Config, vocab_size: int) -> GPT:
    m = config.model
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=m.block_size, n_layer=m.n_layer, n_head=m.n_head,
                         n_embd=m.n_embd, dropout=m.dropout, bias=m.bias,
                         gradient_checkpointing=m.gradient_checkpointing))


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

def train_step(model, optimizer, scaler, next_batch, train: TrainConfig, device, dtype) -> torch.Tensor:
    """Accumulate gradients over train.grad_accum_steps micro-batches, clip, update. Returns the mean loss."""
    total = torch.zeros((), device=device)
    for _ in range(train.grad_accum_steps):
        x, y = (t.to(device, non_blocking=True) for t in next_batch())
        with autocast_context(device, dtype):
            _, loss = model(x, y)
        scaler.scale(loss / train.grad_accum_steps).backward()
        total += loss.detach()
    if train.grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total / train.grad_accum_steps


@torch.no_grad()
def evaluate(model, data: TokenData, config: Config, device, dtype) -> dict:
    """Mean loss over the same eval_batches windows of each split every time, so evaluations compare."""
    model.eval()
    losses = {}
    for split, tokens in (("train", data.train), ("val", data.val)):
        sampler = BatchSampler(tokens, config.model.block_size, config.train.batch_size, config.train.seed + 1)
        total = 0.0
        for _ in range(config.train.eval_batches):
            x, y = (t.to(device) for t in sampler.next_batch())
            with autocast_context(device, dtype):
                total += model(x, y)[1].item()
        losses[split] = total / config.train.eval_batches
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

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def keep_until(self, step: int) -> None:
        """Drop records after `step` (a resumed run rewrites them), atomically."""
        kept = [r for r in self.read() if r["step"] <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))


CHECKPOINT_PATTERN = "ckpt_*.pt"


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"ckpt_{step:08d}.pt"


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, oldest step first."""
    return sorted(folder.glob(CHECKPOINT_PATTERN)) if folder.is_dir() else []


def save_checkpoint(payload: dict, path: Path) -> None:
    """torch.save to a temporary file, fsync, rename: a crash mid-write never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KernelError(f"checkpoint {path} does not exist") from None
    except Exception as err:  # torch raises several types for a damaged file
        raise KernelError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from None


def find_resume_checkpoint(resume: str, out_dir: Path) -> Path | None:
    """train.resume: 'never', 'auto' (the newest checkpoint in out_dir, if any) or a file/folder path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(out_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if path.is_dir():
        found = list_checkpoints(path) or list_checkpoints(path / "checkpoints")
        if not found:
            raise KernelError(f"train.resume={resume!r}: no {CHECKPOINT_PATTERN} in that folder")
        return found[-1]
    if not path.is_file():
        raise KernelError(f"train.resume={resume!r}: no such checkpoint file or folder; "
                          "use 'auto', 'never' or a path to a ckpt_*.pt file")
    return path


def rng_states() -> dict:
    bit_generator, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [bit_generator, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    bit_generator, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((bit_generator, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


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
    stopped_by: str          # "max_steps" or "time_budget"
    resumed_from: str | None = None
    history: list = field(default_factory=list)


def train(config: Config, data: TokenData, out_dir: Path, device: torch.device, dtype: torch.dtype,
          checkpoint: dict | None = None, checkpoint_source: Path | None = None) -> TrainResult:
    t, m = config.train, config.model
    started = time.perf_counter()
    ckpt_dir, metrics = out_dir / "checkpoints", MetricsLog(out_dir / "metrics.jsonl")

    model = build_model(config, data.tokenizer.vocab_size).to(device)
    optimizer = make_optimizer(model, t, device)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    sampler = BatchSampler(data.train, m.block_size, t.batch_size, t.seed)
    step, tokens, last_eval, train_loss = 0, 0, {}, float("nan")
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        sampler.load_state_dict(checkpoint["sampler"])
        restore_rng_states(checkpoint["rng"])
        step, tokens, last_eval = checkpoint["step"], checkpoint["tokens"], checkpoint["last_eval"]
        train_loss = checkpoint["train_loss"]
        metrics.keep_until(step)
        print(f"[train] resumed from {checkpoint_source} at step {step:,} ({tokens:,} tokens)")
    elif metrics.path.exists():
        metrics.path.unlink()  # a fresh run starts a fresh metrics file
    runner = maybe_compile(model, t.compile, device)
    runner.train()

    def save(at_step: int) -> None:
        payload = {"format": 1, "step": at_step, "tokens": tokens, "last_eval": last_eval, "train_loss": train_loss,
                   "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scaler": scaler.state_dict(), "sampler": sampler.state_dict(), "rng": rng_states(),
                   "config": config_to_dict(config), "tokenizer": data.tokenizer.to_dict()}
        save_checkpoint(payload, checkpoint_path(ckpt_dir, at_step))
        write_text_atomic(ckpt_dir / "config.yaml", config_to_yaml(config))
        for old in list_checkpoints(ckpt_dir)[: -t.keep_checkpoints]:
            old.unlink()

    def run_eval(at_step: int) -> dict:
        result = evaluate(runner, data, config, device, dtype)
        record = {"step": at_step, "tokens": tokens, **result, "elapsed_s": round(time.perf_counter() - started, 3)}
        metrics.append(record)
        tqdm.write(f"[eval] step {at_step:,}: train {result['eval_train_loss']:.4f} | val {result['val_loss']:.4f}"
                   f" | ppl {result['val_ppl']:.2f} | bpb {result['val_bpb']:.3f}")
        return record

    if step == 0:
        last_eval = run_eval(0)
    tokens_per_step = t.batch_size * t.grad_accum_steps * m.block_size
    train_seconds, window_loss, window_steps, window_start = 0.0, torch.zeros((), device=device), 0, time.perf_counter()
    start_step, stopped_by = step, "max_steps"
    progress = tqdm(total=t.max_steps, initial=step, desc="train", unit="step", mininterval=1.0, dynamic_ncols=True)
    while step < t.max_steps:
        if t.time_budget is not None and time.perf_counter() - started >= t.time_budget:
            stopped_by = "time_budget"
            tqdm.write(f"[train] time budget of {t.time_budget:.0f}s reached at step {step:,}: stopping cleanly")
            break
        lr = lr_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_start = time.perf_counter()
        window_loss += train_step(runner, optimizer, scaler, sampler.next_batch, t, device, dtype)
        step, tokens, window_steps = step + 1, tokens + tokens_per_step, window_steps + 1
        train_seconds += time.perf_counter() - step_start
        progress.update(1)
        if step % t.log_interval == 0 or step == t.max_steps:
            train_loss = (window_loss / window_steps).item()  # the only host sync of the window
            elapsed = time.perf_counter() - window_start
            metrics.append({"step": step, "tokens": tokens, "train_loss": train_loss, "lr": lr,
                            "tokens_per_s": round(window_steps * tokens_per_step / elapsed, 1),
                            "elapsed_s": round(time.perf_counter() - started, 3)})
            progress.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{window_steps * tokens_per_step / elapsed:,.0f}")
            window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()
        if step % t.eval_interval == 0 or step == t.max_steps:
            last_eval = run_eval(step)
        if t.checkpoint_interval and step % t.checkpoint_interval == 0 and step != t.max_steps:
            save(step)
    progress.close()
    if window_steps:  # the loop stopped between log steps (time budget)
        train_loss = (window_loss / window_steps).item()
    if last_eval.get("step") != step:
        last_eval = run_eval(step)
    save(step)
    trained_tokens = (step - start_step) * tokens_per_step
    return TrainResult(model=model, step=step, tokens=tokens, last_eval=last_eval, train_loss=train_loss,
                       tokens_per_s=trained_tokens / train_seconds if train_seconds else 0.0,
                       wall_s=time.perf_counter() - started, stopped_by=stopped_by,
                       resumed_from=str(checkpoint_source) if checkpoint is not None else None,
                       history=metrics.read())
