"""## 19. Planning: the model a time budget can buy

With `model.size: auto` the run chooses its model's shape before training, for this device, this corpus and
this budget (`train.time_budget`, 8 h by default on Kaggle), instead of taking `model.n_layer` / `n_embd` /
`n_head` as given:

1. **Measure.** A ladder of shapes (1 x 64 up to 32 x 2048) is timed for a few real training steps each,
   smallest first, on the run's device and number format, with its batch and context (heads 32 wide below
   256, then 64; `model.n_kv_head` etc. keep their rule). Measuring stops when it has used its share of the
   budget (5%) or when larger shapes can only predict worse; a shape not measured is credited with the FLOP
   rate of the largest one that was (and is measured before it is chosen).
2. **Predict.** Each shape's training tokens are its throughput x the time left to train. Its loss is
   predicted by the Chinchilla law, L = E + A / N^a + B / D^b (Hoffmann et al. 2022), with the
   data-constrained corrections of Muennighoff et al. (2023): tokens seen again after the first epoch count
   less and less (repeating more than ~4 times buys little), and so do parameters beyond what the unique
   tokens can fill.
3. **Choose** the shape with the lowest predicted loss among those that run: one that runs out of GPU
   memory ends the ladder. The learning rates (`train.lr`, `train.min_lr`) are scaled by sqrt(config width /
   chosen width), as wider models want smaller steps. The plan is printed in one block and saved in
   `summary.json` (`plan`).

`model.size: "25M"` asks for about that many parameters (the ladder shape closest to it, no measuring).
A resumed run keeps the shape its checkpoint was planned with.
"""

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field

import torch

from kernel.env import KernelError, resolve_dtype
from kernel.config import Config
from kernel.model import build_model, model_shape
from kernel.optim import make_optimizer
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
    why: str = ""

    def to_dict(self) -> dict:
        return {"size": self.size, "chosen": self.chosen.shape, "params": self.chosen.params, "why": self.why,
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
                         f"tokens/s ({'measured' if c.measured else 'from FLOPs'}) | {c.tokens / 1e6:8.1f}M tokens, "
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
                         now=time.perf_counter) -> float:
    """Real training steps of this shape on random tokens: one to warm up, then MEASURED_STEPS timed, in the
    number format the run would train this shape in."""
    trial = shaped(config, candidate.n_layer, candidate.n_embd)
    dtype = resolve_dtype(trial.train.dtype, device, trial.model.n_embd)[0]
    torch.manual_seed(0)
    model = build_model(trial, vocab_size).to(device)
    optimizer = make_optimizer(model, trial.train, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batch, block = trial.train.batch_size, trial.model.block_size
    tokens = torch.randint(vocab_size, (batch, block + 1), device=device)
    step = [(tokens[:, :-1], tokens[:, 1:])] * trial.train.grad_accum_steps
    train_step(model, optimizer, scaler, step, trial.train, device, dtype)
    synchronize(device)
    started = now()
    for _ in range(MEASURED_STEPS):
        train_step(model, optimizer, scaler, step, trial.train, device, dtype)
    synchronize(device)
    return MEASURED_STEPS * batch * block * trial.train.grad_accum_steps / max(1e-9, now() - started)


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


def plan_model(config: Config, vocab_size: int, unique_tokens: int, train_seconds: float | None,
               device: torch.device, processes: int = 1, now=time.perf_counter) -> Plan:
    """The shape for `config.model.size`, for `train_seconds` of training on `unique_tokens` tokens by
    `processes` processes (each trains its share of every batch, so throughput adds up)."""
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

    def measure(candidate: Candidate) -> float:
        return processes * measure_tokens_per_s(config, candidate, vocab_size, device, now)

    tried = timed_candidates(candidates, train_seconds, unique_tokens, measure, started, now)
    chosen = best_runnable(tried, measure, train_seconds, unique_tokens, started, now)
    tried = [c for c in tried if c.measured or c.params < chosen.params]  # what ran out of memory is left out
    spent = now() - started
    return Plan(config.model.size, chosen, tried, train_seconds - spent, unique_tokens, spent,
                why=f"{chosen.shape} ({chosen.params / 1e6:.2f}M parameters) has the lowest predicted loss for "
                    f"{(train_seconds - spent) / 60:.1f} min of training on {unique_tokens / 1e6:.2f}M unique tokens")


def timed_candidates(candidates: list[Candidate], train_seconds: float, unique_tokens: int, measure,
                     started: float, now) -> list[Candidate]:
    """Measure smallest first while time allows; past the last measured shape, predict from its FLOP rate.
    Stop once the predicted loss has risen twice in a row (larger shapes cannot do better)."""
    measuring_ends = started + MEASURE_SHARE * train_seconds
    flop_rate, rises, tried = 0.0, 0, []
    for candidate in candidates:
        if now() < measuring_ends:
            try:
                candidate.tokens_per_s, candidate.measured = measure(candidate), True
            except torch.cuda.OutOfMemoryError:  # this shape and every larger one do not fit the device
                break
            flop_rate = candidate.tokens_per_s * candidate.flops_per_token
        else:
            candidate.tokens_per_s = flop_rate / candidate.flops_per_token
        predict(candidate, train_seconds * (1 - MEASURE_SHARE), unique_tokens)
        rises = rises + 1 if tried and candidate.loss > tried[-1].loss else 0
        tried.append(candidate)
        if rises >= 2:
            break
    for candidate in tried:  # with the time actually left once planning is done
        predict(candidate, train_seconds - (now() - started), unique_tokens)
    return tried


def best_runnable(tried: list[Candidate], measure, train_seconds: float, unique_tokens: int, started: float,
                  now) -> Candidate:
    """The lowest predicted loss among shapes that run: a shape only predicted is measured now (it may not
    fit the device's memory, or run slower than its FLOPs say)."""
    while tried:
        best = min(tried, key=lambda c: c.loss)
        if best.measured:
            return best
        try:
            best.tokens_per_s, best.measured = measure(best), True
            predict(best, train_seconds - (now() - started), unique_tokens)
        except torch.cuda.OutOfMemoryError:
            tried = [c for c in tried if c.params < best.params]
    raise KernelError("model.size=auto: even the smallest shape does not fit the device's memory with this batch; "
                      "lower train.batch_size or model.block_size")


def predict(candidate: Candidate, seconds: float, unique_tokens: int) -> None:
    candidate.tokens = candidate.tokens_per_s * max(0.0, seconds)
    candidate.loss = predicted_loss(candidate.core_params, candidate.tokens, unique_tokens)


def planned_before(config: Config, saved: Config) -> Config:
    """A resumed run keeps what its plan chose at the start (the keys `shaped` sets: the model's shape and the
    learning rates scaled to it), whatever this session's budget would choose."""
    print(f"[plan] resumed: the shape planned at the start, {saved.model.n_layer} x {saved.model.n_embd}")
    return dataclasses.replace(config, model=saved.model, train=dataclasses.replace(
        config.train, lr=saved.train.lr, min_lr=saved.train.min_lr))
