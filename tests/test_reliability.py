"""Crashes, signals, bad numbers and full disks: the run keeps what it had and says what happened."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kernel.checkpoint as checkpoint_module
import kernel.train as train_module
from kernel.env import KernelError
from kernel.main import run
from kernel.progress import MetricsLog
from kernel.model import GPT
from kernel.checkpoint import checksum_path, list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def metrics_without_timing(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "train_seconds_total", "tokens_per_s", "mfu")} for r in rows]


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny, capsys):
    config = tiny(train__max_steps=60, train__checkpoint_interval=20, train__keep_checkpoints=5)
    straight = run(config, tmp_path / "straight")
    out = tmp_path / "damaged"
    shutil.copytree(tmp_path / "straight", out)
    newest = list_checkpoints(out / "checkpoints")[-1]
    assert newest.name == "ckpt_00000060.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a crash or a full disk
    capsys.readouterr()
    resumed = run(config, out)
    printed = capsys.readouterr().out
    assert "ckpt_00000060.pt does not match its checksum" in printed and "older checkpoint" in printed
    assert resumed["resumed_from"].endswith("ckpt_00000040.pt")
    assert resumed["val_loss"] == straight["val_loss"]


def test_a_checkpoint_without_its_checksum_is_not_trusted(tmp_path, tiny):
    run(tiny(train__max_steps=20, train__checkpoint_interval=10, train__keep_checkpoints=5), tmp_path)
    newest = list_checkpoints(tmp_path / "checkpoints")[-1]
    checksum_path(newest).unlink()
    with pytest.raises(KernelError, match="has no checksum file"):
        load_checkpoint(newest)
    with pytest.raises(KernelError, match="has no checksum file"):  # named explicitly: no silent fallback
        run(tiny(train__max_steps=30, train__resume=str(newest)), tmp_path / "other")


@pytest.mark.slow
def test_the_best_checkpoint_by_validation_loss_is_kept(tmp_path, tiny, monkeypatch):
    losses = iter([5.0, 1.0, 3.0, 4.0, 4.5, 4.6])  # evals at steps 0, 10, 20, 30, 40, 50

    def fake_evaluate(model, data, config, device, dtype, processes=None):
        value = next(losses)
        return {"eval_train_loss": value, "val_loss": value, "val_ppl": 1.0, "val_bpb": 1.0}

    monkeypatch.setattr(train_module, "evaluate", fake_evaluate)
    summary = run(tiny(train__max_steps=50, train__eval_interval=10, train__checkpoint_interval=10,
                       train__keep_checkpoints=2), tmp_path)
    names = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["ckpt_00000010.pt", "ckpt_00000040.pt", "ckpt_00000050.pt"]
    assert summary["best_checkpoint"] == {"step": 10, "val_loss": 1.0}


def nan_forward_at(steps_with_nan: set[int], calls_per_step: int = 1):
    """GPT.forward that returns a NaN loss on the given training steps (counted by training calls)."""
    original = GPT.forward
    counter = {"calls": 0}

    def forward(self, idx, targets=None, cache=None):
        logits, loss = original(self, idx, targets, cache)
        if self.training and targets is not None:
            step = counter["calls"] // calls_per_step
            counter["calls"] += 1
            if step in steps_with_nan:
                loss = loss * float("nan")
        return logits, loss

    return forward


def test_a_few_nan_losses_are_skipped_and_training_goes_on(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(GPT, "forward", nan_forward_at({3, 4, 5}))
    summary = run(tiny(train__max_steps=30), tmp_path)
    assert summary["steps"] == 30 and summary["val_loss"] == summary["val_loss"]  # finite, not NaN
    weights = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1]).model
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_loss_that_stays_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(GPT, "forward", nan_forward_at(set(range(25, 1000))))
    with pytest.raises(KernelError) as err:
        run(tiny(train__max_steps=100, train__checkpoint_interval=20, train__nan_patience=5), tmp_path)
    message = str(err.value)
    assert "NaN or infinite for 5 consecutive steps (up to step 30)" in message
    assert "ckpt_00000020.pt" in message and "lower train.lr" in message
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["ckpt_00000020.pt"]
    load_checkpoint(tmp_path / "checkpoints" / "ckpt_00000020.pt")

    def not_json(constant):
        raise ValueError(f"metrics.jsonl holds {constant}, which is not JSON")

    assert [json.loads(line, parse_constant=not_json) for line in (tmp_path / "metrics.jsonl").open()]
    log = MetricsLog(tmp_path / "diverged.jsonl")
    log.append({"step": 31, "train_loss": float("nan"), "val_loss": float("inf")})
    assert json.loads((tmp_path / "diverged.jsonl").read_text(), parse_constant=not_json) == \
        {"step": 31, "train_loss": None, "val_loss": None}  # strict JSON: what JSON has no number for is null


def test_a_full_disk_while_checkpointing_leaves_the_previous_checkpoint_intact(tmp_path, tiny, monkeypatch):
    config = tiny(train__max_steps=40, train__checkpoint_interval=20)
    original = checkpoint_module.write_atomic
    calls = {"n": 0}

    def full_disk(path, data):
        calls["n"] += 1
        if path.suffix == ".pt" and "00000040" in path.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, data)

    monkeypatch.setattr(checkpoint_module, "write_atomic", full_disk)
    with pytest.raises(KernelError) as err:
        run(config, tmp_path)
    message = str(err.value)
    assert "ckpt_00000040.pt" in message and "No space left on device" in message and " MB (" in message
    assert "ckpt_00000020.pt is intact" in message
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["ckpt_00000020.pt"]
    assert load_checkpoint(tmp_path / "checkpoints" / "ckpt_00000020.pt").step == 20
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_an_unwritable_output_folder_is_reported_before_any_work(tmp_path, tiny):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(KernelError, match=r"output folder .*a-file/out cannot be written"):
        run(tiny(), blocker / "out")
    assert blocker.read_text() == "not a folder"


SLOW_TINY = ["--set", "model.n_layer=2", "--set", "model.n_head=2", "--set", "model.n_embd=64",
             "--set", "model.block_size=64", "--set", "train.batch_size=16", "--set", "train.device=cpu", "--set", "train.dtype=float32",
             "--set", "train.warmup_steps=5", "--set", "train.eval_interval=20", "--set", "train.eval_batches=2",
             "--set", "train.log_interval=1", "--set", "sample.max_new_tokens=10"]


def start_cli(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kernel", "--config", "configs/llm_cpu.yaml", *SLOW_TINY, *extra,
                             "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(out: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        path = out / "metrics.jsonl"
        if path.exists():
            lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        time.sleep(0.01)
    raise AssertionError(f"the run did not reach step {step}")


@pytest.mark.slow
def test_sigterm_checkpoints_writes_outputs_and_exits_zero(tmp_path):
    out = tmp_path / "out"
    process = start_cli(out, "--set", "train.max_steps=100000", "--set", "train.checkpoint_interval=0")
    wait_for_step(out, 15, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "signal (SIGTERM)" and 15 <= summary["steps"] < 100000
    assert list_checkpoints(out / "checkpoints")[-1].name == f"ckpt_{summary['steps']:08d}.pt"
    assert "SIGTERM received" in output and "skipped" not in output
    # the deliverables are there and load: the curves, the model for transformers, a short sample
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[:2] == (1, 3)
    assert "=== sample 1 | prompt" in (out / "samples.txt").read_text()


def state_tensors(state, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a (nested) optimizer state dict, by its path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list) else []
    return {k: v for key, value in items for k, v in state_tensors(value, f"{prefix}/{key}").items()}


@pytest.mark.slow
def test_sigkill_at_several_steps_then_resume_equals_the_straight_run_bit_for_bit(tmp_path):
    settings = ["--set", "train.max_steps=60", "--set", "train.checkpoint_interval=5", "--set", "model.dropout=0.1"]
    straight = start_cli(tmp_path / "straight", *settings)
    assert straight.wait(timeout=300) == 0
    out = tmp_path / "killed"
    kills = []
    for target in (12, 27, 44):
        process = start_cli(out, *settings)
        wait_for_step(out, target, process)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        kills.append(json.loads([l for l in (out / "metrics.jsonl").read_text().splitlines() if l.endswith("}")][-1])["step"])
    final = start_cli(out, *settings)
    output, _ = final.communicate(timeout=300)
    assert final.returncode == 0, output
    assert len(set(kills)) == 3 and all(k < 60 for k in kills)
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "ckpt_00000060.pt")
    b = load_checkpoint(out / "checkpoints" / "ckpt_00000060.pt")
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    states_a, states_b = state_tensors(a.optimizer), state_tensors(b.optimizer)  # the preset's Muon + AdamW pair
    assert states_a and states_a.keys() == states_b.keys()
    assert all(torch.equal(states_a[k], states_b[k]) for k in states_a)
    assert metrics_without_timing(out) == metrics_without_timing(tmp_path / "straight")
    assert json.loads((out / "summary.json").read_text())["val_loss"] == json.loads(
        (tmp_path / "straight" / "summary.json").read_text())["val_loss"]


def oom_above(max_rows: int):
    """GPT.forward that runs out of memory (as CUDA would) for training batches of more than max_rows."""
    original = GPT.forward

    def forward(self, idx, targets=None, cache=None):
        if self.training and idx.shape[0] > max_rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return original(self, idx, targets, cache)

    return forward


@pytest.mark.slow
def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(tmp_path, tiny, monkeypatch, capsys):
    config = tiny(train__batch_size=12, train__max_steps=30, train__checkpoint_interval=10)
    reference = run(config, tmp_path / "reference")
    monkeypatch.setattr(GPT, "forward", oom_above(4))
    capsys.readouterr()
    squeezed = run(config, tmp_path / "squeezed")
    printed = capsys.readouterr().out + capsys.readouterr().err
    assert "out of memory at micro-batch 12: retrying step 1 with micro-batch 6 x 2" in printed
    assert "micro-batch 3 x 4" in printed
    assert squeezed["tokens"] == reference["tokens"] == 30 * 12 * 32
    assert squeezed["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-4)
    ref_rows, rows = metrics_without_timing(tmp_path / "reference"), metrics_without_timing(tmp_path / "squeezed")
    for a, b in zip(ref_rows, rows):
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-4)
    saved = load_checkpoint(list_checkpoints(tmp_path / "squeezed" / "checkpoints")[-1])
    assert (saved.micro_batch, saved.grad_accum_steps) == (3, 4)


def test_out_of_memory_at_micro_batch_one_gives_up_with_advice(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(GPT, "forward", oom_above(0))
    with pytest.raises(KernelError, match="even with a micro-batch of 1 .* model.gradient_checkpointing"):
        run(tiny(train__batch_size=4), tmp_path)


def test_a_checkpoint_is_memory_mapped_not_read_whole_into_memory(tmp_path, tiny, monkeypatch):
    run(tiny(train__max_steps=10), tmp_path)
    newest = list_checkpoints(tmp_path / "checkpoints")[-1]
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"read whole: {self}") if self == newest
                        else original(self))
    loaded = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loaded.append(kwargs.get("mmap")) or real_load(*args,
                                                                                                           **kwargs))
    checkpoint = load_checkpoint(newest)
    assert checkpoint.step == 10 and loaded == [True]
    newest.write_bytes(original(newest)[:-10])  # truncated: the checksum says so
    with pytest.raises(KernelError, match="does not match its checksum"):
        load_checkpoint(newest)
