"""## 19. Training

The loop: mixed precision chosen by the hardware, gradient accumulation, the optimizer and learning-rate
schedule of section 15, gradient clipping, periodic evaluation, a JSON-lines metrics file and checkpoints
(section 14).

A step learns from the global batch, `batch_size x grad_accum_steps` sequences: a `BatchPlan` splits it into
each process's share (section 13) and that share into micro-batches whose gradients accumulate, which gives
the same gradient as one big batch. A step whose loss or gradients are not finite updates nothing (the run
stops after `train.nan_patience` such losses in a row); with one GPU, a step that runs out of memory is
retried with smaller micro-batches, the batch unchanged. `train()` at the end reads top to bottom: a
`Trainer` holds what stays fixed during a run (model, optimizer, data, files), a `LoopState` what changes
(step, tokens, evaluations, the batch plan), and each phase of a step is one method: stop?, optimizer step,
log, evaluate, checkpoint.
"""

import contextlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch

from kernel.env import (CHECKPOINTS_DIR, CONFIG_FILE, CURVES_FILE, METRICS_FILE, KernelError, dtype_name, peak_flops,
                        precision_advice, write_atomic)
from kernel.values import interval_seconds
from kernel.config import Config, TrainConfig, config_to_dict, config_to_yaml
from kernel.data import TokenData
from kernel.model import GPT, build_model
from kernel.hf_interop import find_model_folder, load_hf_weights
from kernel.lora import adapter_state, build_lora_model, check_same_base, hold_base_in, load_adapters
from kernel.distributed import Processes, from_main, gather_objects, max_across, split_global_batch, sum_across
from kernel.checkpoint import (Checkpoint, checkpoint_path, earlier_sessions, list_checkpoints, prune_checkpoints,
                               restore_process_rng, rng_states, save_checkpoint, saved_metrics)
from kernel.optim import lr_at, make_optimizer, step_limit, wsd_phase
from kernel.compiling import ASSUMED_MFU, autocast_context, compile_choice
from kernel.progress import RESERVE_FLOOR_S, LossWindow, MetricsLog, Progress, StopRequests, TrainingClock


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
    for split in ("train", "val"):
        sampler = data.sampler(split, config.model.block_size, config.train.batch_size, config.train.seed + 1)
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


def nonfinite_error(t: TrainConfig, step: int, ckpt_dir: Path, device: torch.device, dtype: torch.dtype) -> KernelError:
    saved = list_checkpoints(ckpt_dir)
    precision = precision_advice(device, dtype)
    return KernelError(
        f"the training loss was NaN or infinite for {t.nan_patience} consecutive steps (up to step {step:,}); "
        f"the run stopped without saving them. The last good checkpoint is "
        f"{saved[-1] if saved else '(none: no checkpoint was written yet)'}. Try a lower train.lr (now {t.lr:g}), "
        f"{'keep train.grad_clip on, or ' + precision if precision else 'or keep train.grad_clip on'}")


def is_due(step: int, interval: int, max_steps: float) -> bool:
    """Every `interval` steps, and at the last step."""
    return step % interval == 0 or step == max_steps


# --- What the loop keeps and returns --------------------------------------------------------------------

@dataclass
class LoopState:
    """What changes as the run goes; a checkpoint saves it and a resumed run starts from it."""
    plan: BatchPlan
    step: int = 0
    tokens: int = 0                                   # positions trained on (the padding of conversations too)
    step_tokens: int = 0                              # ... in the last step
    train_loss: float = float("nan")                  # the last logged training loss
    last_eval: dict = field(default_factory=dict)     # the last evaluation's metrics line
    best: dict = field(default_factory=dict)          # {"step", "val_loss"} of the best checkpoint kept
    history: list = field(default_factory=list)       # every metrics line so far
    nonfinite_run: int = 0                            # consecutive steps whose loss was NaN or infinite
    train_seconds: float = 0.0                        # time inside optimizer steps (evaluation excluded)
    phase: str = ""                                   # the wsd schedule's phase of this session's last step
    stable_step: int | None = None                    # the newest stable-phase checkpoint's step (kept on disk)
    sessions_before: list = field(default_factory=list)  # the earlier sessions of this training (checkpoint.py)
    stopped_by: str | None = None                     # why this session stopped, once it has


class BeforeStep(NamedTuple):
    """What the processes agreed on before a step."""
    stop: str | None        # why to stop now (None: go on)
    time_used: float        # the share of the training time used: drives the schedule
    checkpoint_due: bool    # a checkpoint_interval given as a duration has passed: save after this step


@dataclass
class TrainResult:
    model: GPT
    step: int
    tokens: int
    last_eval: dict
    train_loss: float
    tokens_per_s: float      # training throughput over every session (evaluation excluded)
    wall_s: float            # this process's time in train(), this session
    train_seconds: float     # training time (loops: steps, evaluations, checkpoints) over every session
    stopped_by: str          # "max_steps", "time_budget" or "signal (SIGTERM)" / "signal (SIGINT)"
    resumed_from: str | None = None
    best: dict = field(default_factory=dict)  # {"step", "val_loss"} of the best checkpoint kept
    mfu: float | None = None  # model FLOPs utilisation of this process's training
    history: list = field(default_factory=list)
    sessions: list = field(default_factory=list)  # one entry per session that trained (checkpoint.py)
    setup_s: float = 0.0     # this session: from the run's start (where a budget starts) to its first step


# --- Sessions: one training over several runs (notebook versions) -----------------------------------------

def throughput(sessions: list[dict]) -> float:
    """Tokens per second inside optimizer steps, over every session whose step time is known."""
    timed = [s for s in sessions if s.get("step_seconds")]
    seconds = sum(s["step_seconds"] for s in timed)
    return sum(s["tokens"] for s in timed) / seconds if seconds else 0.0


def total_seconds(sessions: list[dict]) -> float:
    return sum(s.get("train_seconds") or 0.0 for s in sessions)


def sessions_so_far(state: LoopState, start_step: int, start_tokens: int, loop_seconds: float) -> list[dict]:
    """The earlier sessions, then this one (which started at `start_step`) once it has trained a step."""
    if state.step == start_step:
        return list(state.sessions_before)
    return [*state.sessions_before, {
        "started_step": start_step, "ended_step": state.step, "tokens": state.tokens - start_tokens,
        "train_seconds": round(loop_seconds, 3), "step_seconds": round(state.train_seconds, 3),
        "stopped_by": state.stopped_by}]


# --- The model: every weight, or LoRA's adapters ---------------------------------------------------------

def build_training_model(config: Config, vocab_size: int, device: torch.device,
                         dtype: torch.dtype) -> tuple[GPT, dict]:
    """The model, and with LoRA what checkpoints record of its adapters and pretrained weights (which LoRA
    loads every time, resumed or not: checkpoints hold only the adapters)."""
    if not config.train.lora_rank:
        return build_model(config, vocab_size).to(device), {}
    model, lora = build_lora_model(config, vocab_size)
    hold_base_in(model, dtype, device)
    return model.to(device), lora


# --- Resuming, and a budget too small --------------------------------------------------------------------

def resumed_plan(plan: BatchPlan, checkpoint: Checkpoint) -> BatchPlan:
    """An out-of-memory retry shrank the micro-batch: keep what fit while each process's share is the same."""
    same_share = (checkpoint.world_size == plan.global_batch // plan.share
                  and checkpoint.micro_batch * checkpoint.grad_accum_steps == plan.share)
    if not same_share or checkpoint.micro_batch == plan.micro_batch:
        return plan
    print(f"[train] micro-batch {checkpoint.micro_batch} x {checkpoint.grad_accum_steps} accumulation, "
          "as when it was saved")
    return plan.with_micro_batch(checkpoint.micro_batch)


def resumed_history(checkpoint: Checkpoint, source: Path, is_main: bool) -> list[dict]:
    """The metrics records up to the checkpoint's step (rank 0 keeps them: the curves and metrics.jsonl)."""
    if not is_main:
        return []
    history = saved_metrics(source, checkpoint)
    if history is None:
        print(f"[resume] warning: no {METRICS_FILE} beside {source}: metrics.jsonl and {CURVES_FILE} start at "
              f"step {checkpoint.step:,}")
    return history or []


def budget_spent_in_setup(clock: TrainingClock) -> KernelError:
    return KernelError(
        f"train.time_budget was used up before the first training step: setup (environment, data, model, the "
        f"first evaluation) took {clock.loop_started - clock.run_started:.1f}s of the "
        f"{clock.deadline - clock.run_started:.1f}s budget, and "
        f"{1.5 * sum(clock.longest.values()) + RESERVE_FLOOR_S:.1f}s "
        "are kept to evaluate and save at the end. Raise train.time_budget, or lower train.eval_batches")


# --- The trainer: one method per phase of a step ------------------------------------------------------

class Trainer:
    """What stays fixed during a run (model, optimizer, sampler, files), and one method per phase of the loop.
    Every process makes one; only rank 0 writes files."""

    def __init__(self, config: Config, data: TokenData, out_dir: Path, device: torch.device, dtype: torch.dtype,
                 processes: Processes, clock: TrainingClock, on_eval=None, sample_at_eval=None):
        self.config, self.t, self.data, self.device, self.dtype = config, config.train, data, device, dtype
        self.processes, self.clock = processes, clock
        self.on_eval = on_eval if processes.is_main else None  # called with the metrics history after each eval
        self.sample_at_eval = sample_at_eval if processes.is_main else None  # (model, step) -> text to print
        self.ckpt_dir, self.metrics = out_dir / CHECKPOINTS_DIR, MetricsLog(out_dir / METRICS_FILE)
        self.model, self.lora = build_training_model(config, data.tokenizer.vocab_size, device, dtype)
        self.optimizer = make_optimizer(self.model, self.t, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
        # The same stream on every process: each step draws the global batch and a process takes its share.
        self.sampler = data.sampler("train", config.model.block_size, self.t.batch_size, self.t.seed)
        # at most: conversations (section 8) come in rows no longer than their batch's longest
        self.tokens_per_step = self.t.batch_size * self.t.grad_accum_steps * config.model.block_size
        peak = peak_flops(device, dtype)
        self.peak = peak * processes.world_size if peak else None  # every process's device works on the step
        self.flops_per_token = self.model.flops_per_token()
        self.window = LossWindow(device, clock.now)
        interval = self.t.checkpoint_interval  # steps, or a duration the clock measures
        self.save_every_s = interval_seconds(interval)
        self.save_every_steps = 0 if self.save_every_s is not None else interval
        self.last_saved = clock.now()
        self.evaluator = self.runner = self.model
        self.progress: Progress | None = None

    # --- Restore: a new run, or the state a checkpoint saved --------------------------------------------

    def restore(self, checkpoint: Checkpoint | None, source: Path | None) -> LoopState:
        state = LoopState(plan=BatchPlan.configured(self.t, self.processes.world_size))
        if checkpoint is not None:
            check_same_base(checkpoint.lora, self.lora, str(source))
            if self.lora:
                load_adapters(self.model, checkpoint.model, str(source))
            else:
                self.model.load_state_dict(checkpoint.model)
            self.optimizer.load_state_dict(checkpoint.optimizer)
            self.scaler.load_state_dict(checkpoint.scaler)
            self.sampler.load_state_dict(checkpoint.sampler)
            restore_process_rng(checkpoint, self.processes, self.t.seed)
            state = LoopState(plan=resumed_plan(state.plan, checkpoint), step=checkpoint.step,
                              tokens=checkpoint.tokens, train_loss=checkpoint.train_loss,
                              last_eval=checkpoint.last_eval, best=checkpoint.best,
                              history=resumed_history(checkpoint, source, self.processes.is_main), stable_step=checkpoint.stable_step,
                              phase=checkpoint.lr_phase, sessions_before=earlier_sessions(checkpoint))
            self.window.restore(checkpoint.loss_window)
            print(f"[train] resumed from {source} at step {state.step:,} ({state.tokens:,} tokens)")
        elif self.config.model.init_from and not self.lora:  # a new run starts from the pretrained weights (LoRA's
            # were loaded when its model was built); a resumed one has its own
            folder = find_model_folder(self.config.model.init_from)
            loaded = load_hf_weights(self.model, folder, self.data.tokenizer.vocab_size)
            print(f"[train] starting from {folder}: {loaded} tensors loaded")
        if self.processes.distributed:
            print(f"[dist] {self.processes.world_size} processes, each {state.plan.micro_batch} x "
                  f"{state.plan.accumulation} accumulation of the global batch of {state.plan.global_batch} sequences")
        if self.processes.is_main:  # the metrics file restarts from what the checkpoint knew: later steps replay
            write_atomic(self.metrics.path, "".join(json.dumps(r) + "\n" for r in state.history))
        self.start_step, self.start_tokens = state.step, state.tokens
        return state

    def sessions(self, state: LoopState) -> list[dict]:
        return sessions_so_far(state, self.start_step, self.start_tokens, self.clock.loop_time())

    def seconds_total(self, state: LoopState) -> float:
        """Training time so far over every session: the x axis of the curves' time panel."""
        return round(total_seconds(state.sessions_before) + self.clock.loop_time(), 3)

    def prepare(self, state: LoopState) -> None:
        """Compile and wrap the model (after its weights are loaded), start the progress display."""
        compiled, why = from_main(self.processes, self.compile_choice(state))  # one choice: the same graphs
        print(f"[train] compile: {'on' if compiled else 'off'} ({why})")
        self.evaluator = self.runner = torch.compile(self.model) if compiled else self.model
        if self.processes.distributed:  # averages the gradients across processes in a step's last backward
            self.runner = torch.nn.parallel.DistributedDataParallel(
                self.evaluator, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.runner.train()
        self.window.started = self.clock.now()
        self.clock.start_loop()
        self.progress = Progress(self.clock, step_limit(self.t), state.step, shown=self.processes.is_main)
        self.last_saved = self.clock.now()

    def compile_choice(self, state: LoopState) -> tuple[bool, str]:
        """train.compile's decision for the training this run has left: its budget, or its steps at a step time
        estimated from the model's FLOPs at ASSUMED_MFU of the device's peak."""
        budget = self.clock.deadline - self.clock.now() if self.clock.deadline is not None else None
        step_seconds = (self.flops_per_token * self.tokens_per_step / (self.peak * ASSUMED_MFU)
                        if self.peak else None)
        return compile_choice(self.t.compile, self.device, budget, step_limit(self.t) - state.step, step_seconds)

    # --- Stop? (the time budget, a signal: every process takes the same decision) ---------------------------

    def before_step(self, state: LoopState, stop_requests: StopRequests) -> "BeforeStep":
        """What every process must agree on before the next step, in one exchange: one process's clock or signal
        stops all, all use one schedule, and all save a timed checkpoint together."""
        time_used, out_of_time = self.clock.training_time_used()
        timed_save = self.save_every_s is not None and self.clock.now() - self.last_saved >= self.save_every_s
        out_of_time, signalled, time_used, timed_save = max_across(
            self.processes, [float(out_of_time), float(bool(stop_requests.reason())), time_used, float(timed_save)])
        if out_of_time and state.step == self.start_step:
            raise budget_spent_in_setup(self.clock)
        stop = None
        if out_of_time:
            self.progress.write(f"[train] time budget nearly spent at step {state.step:,}: stopping to evaluate and save")
            stop = "time_budget"
        elif signalled:
            stop = f"signal ({stop_requests.reason() or 'SIGTERM to another process'})"
        return BeforeStep(stop, time_used, bool(timed_save))

    def checkpoint_due(self, state: LoopState, timed: bool) -> bool:
        """After a step: every train.checkpoint_interval steps, or once its duration has passed since the last
        checkpoint (`timed`, agreed before the step). The last step is saved by finish()."""
        if state.step == step_limit(self.t):
            return False
        return timed or bool(self.save_every_steps and state.step % self.save_every_steps == 0)

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
            raise nonfinite_error(self.t, state.step + 1, self.ckpt_dir, self.device, self.dtype)
        # every process's positions: its own times their number (the others' are the same, or about the same in a
        # batch of conversations, whose rows are grouped by length)
        state.step_tokens = sum(x.numel() for x, _ in batches) * self.processes.world_size
        state.step, state.tokens = state.step + 1, state.tokens + state.step_tokens
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
        self.window.add(loss, state.step_tokens)
        if not is_due(state.step, self.t.log_interval, step_limit(self.t)):
            self.progress.advance(state.step)
            return
        state.train_loss, tokens_per_s = self.window.mean(), self.window.tokens_per_s()
        self.record(state, {"step": state.step, "tokens": state.tokens, "train_loss": state.train_loss, "lr": lr,
                            "tokens_per_s": round(tokens_per_s, 1), "elapsed_s": round(self.clock.elapsed(), 3),
                            "train_seconds_total": self.seconds_total(state),
                            "mfu": round(self.flops_per_token * tokens_per_s / self.peak, 5) if self.peak else None})
        self.progress.advance(state.step, state.train_loss, tokens_per_s, lr)
        self.window.reset()

    def run_eval(self, state: LoopState) -> None:
        with self.clock.timing("eval"):  # the sample too: the budget keeps time for the final one
            result = evaluate(self.evaluator, self.data, self.config, self.device, self.dtype, self.processes)
            sample = self.sample_at_eval(self.model, state.step) if self.sample_at_eval is not None else None
        state.last_eval = {"step": state.step, "tokens": state.tokens, **result,
                           "elapsed_s": round(self.clock.elapsed(), 3), "train_seconds_total": self.seconds_total(state)}
        self.record(state, state.last_eval)
        self.progress.write(f"[eval] step {state.step:,}: train {result['eval_train_loss']:.4f} | val "
                            f"{result['val_loss']:.4f} | ppl {result['val_ppl']:.2f} | bpb {result['val_bpb']:.3f}")
        if sample:
            self.progress.write(sample)
        if self.on_eval is not None:
            self.on_eval(state.history)

    def enter_phase(self, state: LoopState, phase: str) -> None:
        """The first step of a decay that the time budget drives: save the weights it starts from, marked
        'stable', so that a run continued with a new budget goes on from them (see checkpoint.py). A decay
        set by max_steps needs none: a resumed run continues it exactly."""
        if phase == "budget_decay" and state.phase in ("", "stable"):  # "": warm-up ran into the decay
            self.save(state, phase="stable")
        state.phase = phase

    def save(self, state: LoopState, phase: str | None = None) -> None:
        if phase == "stable":
            state.stable_step = state.step
        evaluated = state.last_eval if state.last_eval.get("step") == state.step else {}
        if evaluated and (not state.best or evaluated["val_loss"] < state.best["val_loss"]):
            state.best = {"step": state.step, "val_loss": evaluated["val_loss"]}
        process_rngs = gather_objects(self.processes, rng_states())  # every process's dropout RNG: exact resumes
        self.last_saved = self.clock.now()
        if not self.processes.is_main:
            return
        checkpoint = Checkpoint(
            step=state.step, tokens=state.tokens, train_loss=state.train_loss, last_eval=state.last_eval,
            best=state.best, dtype=dtype_name(self.dtype),
            micro_batch=state.plan.micro_batch, grad_accum_steps=state.plan.accumulation,
            loss_window=self.window.state(), world_size=self.processes.world_size, process_rngs=process_rngs,
            lr_phase=phase or state.phase, stable_step=state.stable_step, lora=self.lora,
            sessions=self.sessions(state),
            config=config_to_dict(self.config),
            tokenizer=self.data.tokenizer.to_dict(),
            model=adapter_state(self.model) if self.lora else self.model.state_dict(),
            optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), sampler=self.sampler.state_dict())
        with self.clock.timing("save"):
            save_checkpoint(checkpoint, checkpoint_path(self.ckpt_dir, state.step))
        write_atomic(self.ckpt_dir / CONFIG_FILE, config_to_yaml(self.config))
        prune_checkpoints(self.ckpt_dir, self.t.keep_checkpoints, {state.best.get("step"), state.stable_step})

    def finish(self, state: LoopState) -> None:
        """The step the loop stopped at is always evaluated and saved."""
        self.progress.close()
        if self.window.steps:  # the loop stopped between log steps (time budget, signal)
            state.train_loss = self.window.mean()
        if state.last_eval.get("step") != state.step:
            self.run_eval(state)
        self.save(state)

    def result(self, state: LoopState, resumed_from: Path | None) -> TrainResult:
        """The whole training's figures (every session), not only this session's: a session that had nothing
        left to train reports the others' throughput and time."""
        sessions = self.sessions(state)
        tokens_per_s = throughput(sessions)
        return TrainResult(model=self.model, step=state.step, tokens=state.tokens, last_eval=state.last_eval,
                           train_loss=state.train_loss, tokens_per_s=tokens_per_s,
                           mfu=self.flops_per_token * tokens_per_s / self.peak if self.peak else None,
                           wall_s=self.clock.elapsed(), train_seconds=round(total_seconds(sessions), 3),
                           stopped_by=state.stopped_by,
                           resumed_from=str(resumed_from) if resumed_from is not None else None,
                           best=state.best, history=state.history, sessions=sessions,
                           setup_s=round(self.clock.loop_started - self.clock.run_started, 3))


# --- The loop, top to bottom -------------------------------------------------------------------------

def train(config: Config, data: TokenData, out_dir: Path, device: torch.device, dtype: torch.dtype,
          checkpoint: Checkpoint | None = None, checkpoint_source: Path | None = None,
          deadline: float | None = None, processes: Processes = Processes(), now=time.perf_counter,
          on_eval=None, stop_requests: StopRequests | None = None, run_started: float | None = None,
          sample_at_eval=None) -> TrainResult:
    """Train to train.max_steps, or until `deadline` (a `now()` value; the budget counts from `run_started`)
    leaves just enough time to evaluate, checkpoint and sample, or until a stop signal. Every process calls
    it; only rank 0 writes, and calls `on_eval(history)` after each evaluation (e.g. to redraw the curves)
    and `sample_at_eval(model, step)` during it (a short sample; returns the text to print)."""
    t = config.train
    clock = TrainingClock(deadline, now, run_started)
    trainer = Trainer(config, data, out_dir, device, dtype, processes, clock, on_eval, sample_at_eval)
    state = trainer.restore(checkpoint, checkpoint_source)
    trainer.prepare(state)
    stops = StopRequests() if stop_requests is None else contextlib.nullcontext(stop_requests)
    try:
        with stops as stop_requests, stop_requests.between_steps():
            if state.step == 0:
                trainer.run_eval(state)  # the untrained model: the first point of the curves
            while state.step < step_limit(t):
                # --- stop for the time budget or a signal? (and is a timed checkpoint due?)
                before = trainer.before_step(state, stop_requests)
                if before.stop:
                    state.stopped_by = before.stop
                    break
                # --- a wsd schedule about to decay: keep the stable weights (a later session continues them)
                trainer.enter_phase(state, wsd_phase(state.step, t, before.time_used))
                # --- one optimizer step: forward, backward and update over the global batch
                lr = lr_at(state.step, t, before.time_used)
                loss = trainer.optimizer_step(state, lr)
                # --- log, evaluate and checkpoint when due
                trainer.log(state, loss, lr)
                if is_due(state.step, t.eval_interval, step_limit(t)):
                    trainer.run_eval(state)
                if trainer.checkpoint_due(state, before.checkpoint_due):
                    trainer.save(state)
            # --- the end: evaluate and save the last step
            state.stopped_by = state.stopped_by or "max_steps"
            trainer.finish(state)
    finally:
        trainer.progress.close()
    return trainer.result(state, checkpoint_source if checkpoint is not None else None)
