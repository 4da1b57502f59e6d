"""Shared helpers: tiny configs that train in seconds on the real demo corpus."""

import pytest

from kernel.config import load_config

# A model small enough to train a few hundred steps in seconds on 2 CPU cores. The dtype is fixed, so that runs
# compared bit for bit do not depend on the machine's bf16 support, and so is the optimizer: the preset's Muon
# orthogonalises in bf16, which magnifies float rounding, so comparisons of runs (1 vs 2 processes, k micro-
# batches vs one) use AdamW here and Muon has its own tests with its own tolerances.
TINY = {
    "train.optimizer": "adamw",
    "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 64, "model.block_size": 32,
    "train.device": "cpu", "train.dtype": "float32", "train.batch_size": 8, "train.max_steps": 40, "train.warmup_steps": 5,
    "train.eval_interval": 20, "train.eval_batches": 4, "train.log_interval": 5,
    "train.checkpoint_interval": 20, "sample.max_new_tokens": 20,
}


def tiny_config(**changes):
    """The CPU preset shrunk to TINY, with `changes` given as section__key=value."""
    overrides = dict(TINY)
    overrides.update({key.replace("__", "."): value for key, value in changes.items()})
    return load_config("configs/llm_cpu.yaml", overrides)


@pytest.fixture
def tiny():
    return tiny_config


class StepClock:
    """A clock for time-budget tests in which time passes only when a training step runs: `seconds_per_step`
    per step, nothing for setup, evaluation or checkpoints. A budget then means the same number of steps on
    any machine, busy or idle. Install it with `install(monkeypatch)` and pass it as `run(..., now=clock)`."""

    def __init__(self, seconds_per_step: float = 1.0):
        self.seconds, self.seconds_per_step = 0.0, seconds_per_step

    def __call__(self) -> float:
        return self.seconds

    def install(self, patch) -> "StepClock":
        """patch(module, name, value): pytest's monkeypatch.setattr, or setattr itself in a subprocess."""
        import kernel.train as train_module
        original = train_module.train_step

        def timed_step(*args, **kwargs):
            self.seconds += self.seconds_per_step
            return original(*args, **kwargs)

        patch(train_module, "train_step", timed_step)
        return self
