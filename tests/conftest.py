"""Shared helpers: tiny configs that train in seconds on the real demo corpus."""

import pytest

from kernel.config import load_config

# A model small enough to train a few hundred steps in seconds on 2 CPU cores. The dtype is fixed: the CPU
# precision probe times the machine, and runs compared bit for bit must not depend on a measurement.
TINY = {
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
