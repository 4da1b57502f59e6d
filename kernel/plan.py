"""## 20. Planning: the model a time budget can buy

With `model.size: auto` the run chooses its model's shape before training, for this device, this corpus and
this budget (`train.time_budget`, 8 h by default on Kaggle), instead of taking `model.n_layer` / `n_embd` /
`n_head` as given:

1. **Measure.** A ladder of shapes (1 x 64 up to 32 x 2048) is timed for a few real training steps each,
   smallest first, on the run's device and number format, with its context and as one process of the run
   takes its share of the batch (in the micro-batches the memory plan gives that shape there; the processes'
   throughputs add up). Heads are 32 wide below 256, then 64. Measuring stays in its share of the budget
   (5%: a measurement that would end past it is not started) and stops when larger shapes can only predict
   worse; a shape not measured is credited with the FLOP rate of the largest one that was (and is measured
   before it is chosen). A budget too short for even the smallest shape's first steps at the device's peak
   speed is refused in one line before anything is measured.
2. **Predict.** Each shape's training tokens are its throughput x the time left to train, but at most 16
   passes over the corpus (at least the warm-up and as many steps again). Its loss is predicted by the
   Chinchilla law, L = E + A / N^a + B / D^b (Hoffmann et al. 2022), with the data-constrained corrections
   of Muennighoff et al. (2023): tokens seen again after the first epoch count less and less (after 16
   passes a repeated token is worth less than 40% of a new one), and so do parameters beyond what the
   unique tokens can fill.
3. **Choose** the shape with the lowest predicted loss among those that fit the memory; but a smaller one
   that the corpus stops early, within 1% of it (the law's own error), is preferred: the same result in less
   of the budget. A small corpus then gets a model that ends after 16 passes (`train.max_steps` is set to
   them) instead of repeating the corpus for 8 hours. The learning rates (`train.lr`, `train.min_lr`) are
   scaled by sqrt(config width / chosen width), as wider models want smaller steps. The plan is printed in
   one block and saved in `summary.json` (`plan`).

`model.size: "25M"` asks for about that many parameters (the ladder shape closest to it, no measuring).
A resumed run keeps the shape its checkpoint was planned with.
"""

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field

import torch

from kernel.env import PEAK_FLOPS, KernelError, dtype_name, peak_flops, resolve_dtype
from kernel.config import Config
from kernel.model import build_model, model_shape
from kernel.optim import make_optimizer, step_limit
from kernel.memory import DeviceSpec, plan_memory, process_capacity
from kernel.train import train_step

# (layers, width): deeper as it grows wider, as in GPT-2's and Llama's families.
LADDER = [(1, 64), (2, 96), (2, 128), (3, 160), (3, 192), (4, 256), (5, 320), (6, 384), (8, 512), (10, 640),
          (12, 768), (16, 1024), (20, 1280), (24, 1536), (32, 2048)]
NARROW_HEADS, WIDE_HEADS, WIDE = 32, 64, 256  # head width: 32 below 256 wide (the CPU preset's 4 x 32), then 64
# Chinchilla's fit (approach 3): loss in nats per token from parameters N and training tokens D.
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
REPEAT_DECAY = 15.4        # Muennighoff et al.: how fast repeated tokens lose value (R*_D)
EXCESS_PARAMETER_DECAY = 5.3  # ... and parameters beyond what the unique tokens support (R*_N)
TOKENS_PER_PARAMETER = 20  # the compute-optimal ratio the law implies (to size "what the data supports")
# Small models on a CPU sit far from the law's home ground: this factor on the law's data term is calibrated on
# the project's 64 s CPU benchmark (BENCHMARKS.md), where the best shape for 64 s was known.
DATA_TERM_SCALE = 1.0      # the one calibration knob of the law
MAX_EPOCHS = 16            # passes over the corpus at most: by then a repeated token is worth < 40% of a new one
LOSS_TOLERANCE = 0.01      # predicted losses closer than this (relative) are within the law's error of each other
MEASURE_SHARE = 0.05       # of the budget, for timing the candidates
MEASURED_STEPS = 2         # timed steps per candidate, after one warm-up step
SIZE_PATTERN = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMB])$", re.IGNORECASE)


@dataclass
class Candidate:
    n_layer: int
    n_embd: int
    params: int                   # trainable parameters, a tied embedding counted once
    core_params: int              # without the embedding tables: what the law counts (Kaplan et al. 2020)
    flops_per_token: float
    tokens_per_s: float = 0.0     # measured, or at the largest measured shape's FLOP rate
    measured: bool = False
    tokens: float = 0.0           # predicted in the training time
    loss: float = math.inf        # the law's prediction: it ranks shapes (its scale is the law's, not this corpus's)

    @property
    def shape(self) -> str:
        return f"{self.n_layer} x {self.n_embd}"


@dataclass
class Plan:
    size: str                     # what model.size asked for
    chosen: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    train_seconds: float = 0.0
    unique_tokens: int = 0
    plan_seconds: float = 0.0
    steps: int | None = None      # train.max_steps when the corpus, not the budget, ends the training
    why: str = ""
    rates: str = "measured"       # where the throughputs come from: "measured" here, or "estimated"

    def to_dict(self) -> dict:
        return {"size": self.size, "chosen": self.chosen.shape, "params": self.chosen.params, "why": self.why,
                "steps": self.steps,
                "train_seconds": round(self.train_seconds, 1), "unique_tokens": self.unique_tokens,
                "plan_seconds": round(self.plan_seconds, 2),
                "candidates": [{"shape": c.shape, "params": c.params, "tokens_per_s": round(c.tokens_per_s),
                                "measured": c.measured, "tokens": round(c.tokens),
                                "epochs": round(c.tokens / max(1, self.unique_tokens), 2),
                                "law_score": round(c.loss, 4) if math.isfinite(c.loss) else None}
                               for c in self.candidates]}

    def report(self) -> str:
        lines = [f"[plan] model.size={self.size}: {self.why}"]
        for c in self.candidates:
            mark = "->" if c is self.chosen else "  "
            lines.append(f"[plan] {mark} {c.shape:>9} {c.params / 1e6:7.2f}M params | {c.tokens_per_s:>10,.0f} "
                         f"tokens/s ({self.rates if c.measured else 'from FLOPs'}) | {c.tokens / 1e6:8.1f}M tokens, "
                         f"{c.tokens / max(1, self.unique_tokens):6.1f} epochs | law's score {c.loss:.3f}")
        return "\n".join(lines)


# --- The law ---------------------------------------------------------------------------------------------

def effective(amount: float, supported: float, decay: float) -> float:
    """Muennighoff et al.'s diminishing returns: beyond `supported`, each extra unit counts less and less."""
    if amount <= supported:
        return amount
    extra = amount / supported - 1
    return supported + supported * decay * (1 - math.exp(-extra / decay))


def predicted_loss(params: float, tokens: float, unique_tokens: float) -> float:
    law = CHINCHILLA
    effective_tokens = effective(tokens, unique_tokens, REPEAT_DECAY)
    effective_params = effective(params, unique_tokens / TOKENS_PER_PARAMETER, EXCESS_PARAMETER_DECAY)
    return (law["E"] + law["A"] / effective_params ** law["alpha"]
            + DATA_TERM_SCALE * law["B"] / max(1.0, effective_tokens) ** law["beta"])


# --- Candidates and their throughput ---------------------------------------------------------------------

def ladder(config: Config, vocab_size: int) -> list[Candidate]:
    """Every shape of the ladder, with its size, for this config's architecture, context and vocabulary.
    Sizes grow linearly with depth, so a 1- and a 2-layer model of each width (built on the meta device:
    no memory) give every depth's exactly."""
    candidates = []
    for n_layer, n_embd in LADDER:
        one, two = (layer_model(config, layers, n_embd, vocab_size) for layers in (1, 2))
        per_layer = [b - a for a, b in zip(one, two)]
        params, tables, flops = (a + (n_layer - 1) * d for a, d in zip(one, per_layer))
        candidates.append(Candidate(n_layer, n_embd, params, params - tables, flops))
    return candidates


def layer_model(config: Config, n_layer: int, n_embd: int, vocab_size: int) -> tuple[int, int, float]:
    """(parameters, of which embedding tables, training FLOPs per token) of one shape."""
    model = model_shape(shaped(config, n_layer, n_embd), vocab_size)
    tables = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return model.num_params(), tables, model.flops_per_token()


def shaped(config: Config, n_layer: int, n_embd: int) -> Config:
    """The config with this shape (heads 32 or 64 wide), the learning rates scaled by sqrt(config width / width)."""
    scale = math.sqrt(config.model.n_embd / n_embd)
    n_head = n_embd // (NARROW_HEADS if n_embd < WIDE else WIDE_HEADS)
    model = dataclasses.replace(config.model, n_layer=n_layer, n_embd=n_embd, n_head=n_head)
    train = dataclasses.replace(config.train, lr=config.train.lr * scale, min_lr=config.train.min_lr * scale)
    return dataclasses.replace(config, model=model, train=train)


def measure_tokens_per_s(config: Config, candidate: Candidate, vocab_size: int, device: torch.device,
                         processes: int = 1, now=time.perf_counter) -> float:
    """Real training steps of this shape on random tokens, as one process of `processes` would take them: its
    share of the batch, in the micro-batches (and with the gradient checkpointing) the memory plan gives it
    on this device, in the number format the run would use. One step to warm up, then MEASURED_STEPS timed;
    the processes' throughputs add up. Raises DoesNotFit when the memory plan or the device refuses it."""
    trial = shaped(config, candidate.n_layer, candidate.n_embd)
    dtype = resolve_dtype(trial.train.dtype, device, trial.model.n_embd)[0]
    trial = fitted(trial, vocab_size, device, dtype, processes)
    torch.manual_seed(0)
    try:
        model = build_model(trial, vocab_size).to(device)
        optimizer = make_optimizer(model, trial.train, device)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        micro, accumulation = trial.train.batch_size, trial.train.grad_accum_steps
        tokens = torch.randint(vocab_size, (micro, trial.model.block_size + 1), device=device)
        step = [(tokens[:, :-1], tokens[:, 1:])] * accumulation
        train_step(model, optimizer, scaler, step, trial.train, device, dtype)
        synchronize(device)
        started = now()
        for _ in range(MEASURED_STEPS):
            train_step(model, optimizer, scaler, step, trial.train, device, dtype)
        synchronize(device)
    except torch.cuda.OutOfMemoryError as err:
        raise DoesNotFit(str(err)) from None
    seconds = max(1e-9, now() - started)
    return processes * MEASURED_STEPS * micro * accumulation * trial.model.block_size / seconds


class DoesNotFit(Exception):
    """A shape the device's memory cannot train (by the memory plan, or the device's own out-of-memory error)."""


def fitted(config: Config, vocab_size: int, device: torch.device, dtype: torch.dtype, processes: int) -> Config:
    """One process's pieces of the global batch: its share as micro-batch x accumulation (batch_size and
    grad_accum_steps become those), and gradient checkpointing, as the memory plan chooses them here."""
    try:
        plan = plan_memory(config, vocab_size, dtype, processes, process_capacity(device, processes), device.type,
                           str(device))
    except KernelError as err:
        raise DoesNotFit(str(err)) from None
    model = dataclasses.replace(config.model, gradient_checkpointing=plan.gradient_checkpointing)
    train = dataclasses.replace(config.train, batch_size=plan.micro_batch, grad_accum_steps=plan.accumulation)
    return dataclasses.replace(config, model=model, train=train)


def estimated_tokens_per_s(config: Config, vocab_size: int, spec: DeviceSpec, mfu: float):
    """For a device that is not here (`python -m kernel plan --device t4x2 --budget 8h`): each shape's
    throughput from its FLOPs at `mfu` of the device's data-sheet peak, every process adding its own; a shape
    the memory plan refuses there does not fit."""
    peak = device_peak(spec)

    def tokens_per_s(candidate: Candidate) -> float:
        trial = shaped(config, candidate.n_layer, candidate.n_embd)
        try:
            plan_memory(trial, vocab_size, spec.dtype, spec.processes, spec.memory, spec.type, spec.description)
        except KernelError as err:
            raise DoesNotFit(str(err)) from None
        return spec.processes * peak * mfu / candidate.flops_per_token
    return tokens_per_s


def device_peak(spec: DeviceSpec) -> float:
    """A named device's data-sheet FLOP/s in the format it trains in (env.PEAK_FLOPS)."""
    return PEAK_FLOPS[spec.gpu][dtype_name(spec.dtype)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- Choosing ----------------------------------------------------------------------------------------------

def requested_params(size: str) -> float | None:
    """'25M' -> 25e6; 'auto' -> None."""
    if size == "auto":
        return None
    number, unit = SIZE_PATTERN.match(size).groups()
    return float(number) * {"K": 1e3, "M": 1e6, "B": 1e9}[unit.upper()]


@dataclass
class Limits:
    """What bounds every shape's training, whatever its speed."""
    train_seconds: float      # the budget's time for planning and training
    unique_tokens: int        # the corpus's training tokens
    step_tokens: int          # tokens per optimizer step (global batch x context)
    min_steps: int            # the fewest steps a planned run takes
    max_steps: float          # train.max_steps (inf for auto)

    def token_limit(self) -> float:
        """At most MAX_EPOCHS passes over the corpus (the data-constrained rule), at least `min_steps` steps
        (a corpus too small for them is repeated more), at most train.max_steps."""
        return min(max(MAX_EPOCHS * self.unique_tokens, self.min_steps * self.step_tokens),
                   self.max_steps * self.step_tokens)


def plan_model(config: Config, vocab_size: int, unique_tokens: int, train_seconds: float | None,
               device: torch.device, processes: int = 1, now=time.perf_counter, tokens_per_s=None) -> Plan:
    """The shape for `config.model.size`, for `train_seconds` of training on `unique_tokens` tokens by
    `processes` processes. `tokens_per_s(candidate)`: measured on `device` unless given (an estimate)."""
    started = now()
    candidates = ladder(config, vocab_size)
    wanted = requested_params(config.model.size)
    if wanted is not None:
        chosen = min(candidates, key=lambda c: abs(math.log(c.params / wanted)))
        return Plan(config.model.size, chosen, [chosen], why=f"the shape closest to {wanted / 1e6:g}M parameters",
                    plan_seconds=now() - started)
    if not train_seconds:
        raise KernelError("model.size=auto sizes the model for train.time_budget, and no budget is set: give one "
                          "(e.g. train.time_budget=2h; on Kaggle it defaults to 8h), or a size such as model.size=25M")
    t, rates = config.train, "measured" if tokens_per_s is None else "estimated"
    limits = Limits(train_seconds, unique_tokens, t.batch_size * t.grad_accum_steps * config.model.block_size,
                    minimum_steps(t), step_limit(t))
    if tokens_per_s is None:
        check_budget_before_measuring(config, candidates[0], limits, device, processes)
        def tokens_per_s(candidate: Candidate) -> float:
            return measure_tokens_per_s(config, candidate, vocab_size, device, processes, now)
    tried = timed_candidates(candidates, limits, tokens_per_s, started, now)
    chosen = best_runnable(tried, tokens_per_s, limits, started, now)
    tried = [c for c in tried if c.measured or c.params < chosen.params]  # what did not fit is left out
    spent = now() - started
    return Plan(config.model.size, chosen, tried, train_seconds - spent, unique_tokens, spent,
                steps=planned_steps(chosen, limits, train_seconds - spent), why=reason(chosen, tried, limits, spent),
                rates=rates)


def minimum_steps(train) -> int:
    """The fewest steps a planned run takes: its warm-up, and as many again at or after the peak rate."""
    return max(2 * train.warmup_steps, 20)


def check_budget_before_measuring(config: Config, smallest: Candidate, limits: Limits, device: torch.device,
                                  processes: int) -> None:
    """A budget too small for even the smallest shape to take its minimum steps at the device's peak FLOP rate
    (no shape can run faster) fails before anything is measured."""
    dtype = resolve_dtype(config.train.dtype, device, smallest.n_embd)[0]
    peak = peak_flops(device, dtype)
    if peak is None:
        return
    needed = limits.min_steps * limits.step_tokens * smallest.flops_per_token / (processes * peak)
    if limits.train_seconds * (1 - MEASURE_SHARE) <= needed:
        raise KernelError(
            f"model.size=auto: train.time_budget leaves {limits.train_seconds:.0f}s after setup, too little for "
            f"even the smallest shape ({smallest.shape}) to take {limits.min_steps} steps on {device} (at least "
            f"{needed:.1f}s at the device's peak speed, plus {MEASURE_SHARE:.0%} to measure the shapes): give a "
            f"longer budget, or a size (model.size=1M) or shape (model.n_layer, model.n_embd) instead of auto")


def timed_candidates(candidates: list[Candidate], limits: Limits, tokens_per_s, started: float,
                     now) -> list[Candidate]:
    """Measure smallest first while the measuring share allows (a measurement predicted to end past it is not
    started); past the last measured shape, predict from its FLOP rate. Stop once the predicted loss has risen
    twice in a row (larger shapes cannot do better)."""
    measuring_ends = started + MEASURE_SHARE * limits.train_seconds
    flop_rate, rises, tried = 0.0, 0, []
    for candidate in candidates:
        measuring = (1 + MEASURED_STEPS) * limits.step_tokens * candidate.flops_per_token / flop_rate if tried else 0.0
        if now() + measuring < measuring_ends or not tried:
            try:
                candidate.tokens_per_s, candidate.measured = tokens_per_s(candidate), True
            except DoesNotFit:  # this shape and every larger one do not fit the device
                break
            flop_rate = candidate.tokens_per_s * candidate.flops_per_token
        else:
            candidate.tokens_per_s = flop_rate / candidate.flops_per_token
        predict(candidate, limits.train_seconds * (1 - MEASURE_SHARE), limits)
        rises = rises + 1 if tried and candidate.loss > tried[-1].loss else 0
        tried.append(candidate)
        if rises >= 2:
            break
    for candidate in tried:  # with the time actually left once planning is done
        predict(candidate, limits.train_seconds - (now() - started), limits)
    return tried


def preferred(tried: list[Candidate], limits: Limits) -> Candidate:
    """The lowest predicted loss; but a smaller shape whose training the corpus ends early (it would repeat the
    corpus MAX_EPOCHS times before the budget ends) is preferred when its loss is within the law's error of the
    best (LOSS_TOLERANCE): the same result in less of the budget, with no larger model just to fill it."""
    best = min(tried, key=lambda c: c.loss)
    return next(c for c in tried if c is best or (c.tokens >= limits.token_limit()
                                                   and c.loss <= best.loss * (1 + LOSS_TOLERANCE)))


def best_runnable(tried: list[Candidate], tokens_per_s, limits: Limits, started: float, now) -> Candidate:
    """The preferred shape among those that run: a shape only predicted is measured now (it may not fit the
    device's memory, or run slower than its FLOPs say)."""
    while tried:
        best = preferred(tried, limits)
        if not math.isfinite(best.loss):
            raise KernelError(
                f"model.size=auto: measuring the shapes left {limits.train_seconds - (now() - started):.0f}s of "
                f"train.time_budget, too little for even {tried[0].shape} to take {limits.min_steps} steps: give a "
                "longer budget, or a size (model.size=1M) instead of auto")
        if best.measured:
            return best
        try:
            best.tokens_per_s, best.measured = tokens_per_s(best), True
            predict(best, limits.train_seconds - (now() - started), limits)
        except DoesNotFit:
            tried = [c for c in tried if c.params < best.params]
    raise KernelError("model.size=auto: even the smallest shape does not fit the device's memory with this batch; "
                      "lower train.batch_size or model.block_size")


def predict(candidate: Candidate, seconds: float, limits: Limits) -> None:
    """Its training tokens in `seconds` (within the limits) and the law's loss for them; a shape that cannot
    take the minimum steps in that time cannot be chosen (infinite loss)."""
    in_time = candidate.tokens_per_s * max(0.0, seconds)
    candidate.tokens = min(in_time, limits.token_limit())
    enough = in_time >= limits.min_steps * limits.step_tokens
    candidate.loss = predicted_loss(candidate.core_params, candidate.tokens, limits.unique_tokens) if enough else math.inf


def planned_steps(chosen: Candidate, limits: Limits, seconds: float) -> int | None:
    """train.max_steps for the chosen shape when the data, not the budget, ends its training (None: the budget)."""
    if chosen.tokens >= chosen.tokens_per_s * seconds or limits.token_limit() == limits.max_steps * limits.step_tokens:
        return None
    return math.ceil(chosen.tokens / limits.step_tokens)


def reason(chosen: Candidate, tried: list[Candidate], limits: Limits, spent: float) -> str:
    left, best = limits.train_seconds - spent, min(tried, key=lambda c: c.loss)
    ranked = ("has the lowest predicted loss" if chosen is best else
              f"is within {LOSS_TOLERANCE:.0%} of the lowest predicted loss ({best.shape}'s)")
    words = (f"{chosen.shape} ({chosen.params / 1e6:.2f}M parameters) {ranked} for {left / 60:.1f} min of "
             f"training on {limits.unique_tokens / 1e6:.2f}M unique tokens")
    if chosen.tokens < chosen.tokens_per_s * left:
        epochs = chosen.tokens / max(1, limits.unique_tokens)
        words += (f"; it stops after {epochs:.1f} passes over the corpus (about "
                  f"{chosen.tokens / chosen.tokens_per_s / 60:.0f} min): more repeats of this corpus buy little")
    return words


def planned(config: Config, n_layer: int, n_embd: int, steps: int | None) -> Config:
    """The config a plan chose: its shape (`shaped`), and train.max_steps when the corpus ends the training."""
    config = shaped(config, n_layer, n_embd)
    return config if steps is None else dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                                              max_steps=steps))


def planned_before(config: Config, saved: Config) -> Config:
    """A resumed run keeps what its plan chose at the start (the keys `planned` sets: the model's shape, the
    learning rates scaled to it, and the steps a small corpus allowed), whatever this session's budget would
    choose."""
    print(f"[plan] resumed: the shape planned at the start, {saved.model.n_layer} x {saved.model.n_embd}")
    max_steps = saved.train.max_steps if config.train.max_steps == "auto" else config.train.max_steps
    return dataclasses.replace(config, model=saved.model, train=dataclasses.replace(
        config.train, lr=saved.train.lr, min_lr=saved.train.min_lr, max_steps=max_steps))
