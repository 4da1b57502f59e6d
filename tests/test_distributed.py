"""Several processes (DistributedDataParallel) on CPU with the gloo backend, started by the real torchrun."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kernel.config import load_config
from kernel.distributed import Processes, split_global_batch
from kernel.env import KernelError
from kernel.main import run
from kernel.checkpoint import list_checkpoints, load_checkpoint
from kernel.model import build_model
from kernel.optim import make_optimizer
from kernel.train import train_step
from tests.conftest import TINY, tiny_config

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "dist_worker.py"
# A global batch of 8 sequences: one process takes 8 x 1, two take 4 x 1 each.
SETTINGS = {**TINY, "train.max_steps": 8, "train.log_interval": 1, "train.eval_interval": 4,
            "train.checkpoint_interval": 4, "train.warmup_steps": 2, "sample.max_new_tokens": 8}


def cli_args(out: Path, settings: dict) -> list[str]:
    return ["--config", "configs/llm_cpu.yaml", *[f"--set={k}={v}" for k, v in settings.items()], "--out", str(out)]


def torchrun(processes: int, out: Path, settings: dict, timeout: float = 240, **options) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N tests/dist_worker.py OPTIONS -- <python -m kernel arguments>`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(WORKER), json.dumps(options), "--", *cli_args(out, settings)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def train_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def val_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def assert_same_run(a: Path, b: Path, weights_within: float | None = None) -> None:
    """Same losses at every step and (nearly) the same final weights: gradients averaged over processes equal
    the single-process gradient up to float rounding. `weights_within`: compare each tensor by the norm of the
    difference relative to its own norm instead of element by element."""
    losses_a, losses_b = train_losses(a), train_losses(b)
    assert losses_a.keys() == losses_b.keys() and len(losses_a) == 8
    for step in losses_a:
        assert losses_b[step] == pytest.approx(losses_a[step], rel=1e-5), step
    for step, loss in val_losses(a).items():
        assert val_losses(b)[step] == pytest.approx(loss, rel=1e-5)
    weights_a = load_checkpoint(a / "checkpoints" / "ckpt_00000008.pt").model
    weights_b = load_checkpoint(b / "checkpoints" / "ckpt_00000008.pt").model
    for name in weights_a:
        if weights_within is None:
            torch.testing.assert_close(weights_b[name], weights_a[name], rtol=1e-4, atol=1e-5)
        else:
            difference = (weights_b[name] - weights_a[name]).norm() / weights_a[name].norm()
            assert difference < weights_within, (name, difference)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    run(load_settings(SETTINGS), out)
    return out


def load_settings(settings: dict):
    return load_config("configs/llm_cpu.yaml", settings)


def test_the_global_batch_is_shared_without_growing_the_micro_batch():
    assert split_global_batch(12, 1, 2) == (6, 1)
    assert split_global_batch(12, 4, 2) == (12, 2)
    assert split_global_batch(8, 1, 1) == (8, 1)
    assert split_global_batch(4, 3, 4) == (3, 1)
    assert split_global_batch(6, 2, 4) == (3, 1)
    with pytest.raises(KernelError, match=r"12 sequences\) cannot be shared evenly by 8 processes"):
        split_global_batch(6, 2, 8)


@pytest.mark.slow
def test_two_processes_follow_the_single_process_run_and_only_rank_0_writes(tmp_path, single_run):
    audit = tmp_path / "audit"
    audit.mkdir()
    result = torchrun(2, tmp_path / "out", SETTINGS, audit=str(audit))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_run(single_run, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["tokens"] == 8 * 8 * 32
    assert "[dist] 2 processes, each 4 x 1 accumulation of the global batch of 8 sequences" in result.stdout
    rank0, rank1 = (json.loads((audit / f"rank{r}.json").read_text()) for r in (0, 1))
    assert any("summary.json" in w for w in rank0) and any("ckpt_00000008.pt" in w for w in rank0)
    assert rank1 == []
    assert result.stdout.count("[done] val loss") == 1  # only rank 0 prints


def rewind_to_step_4(out: Path) -> None:
    """Drop the step-8 checkpoint so the next run resumes from the one at step 4 (same schedule, same stream)."""
    final = out / "checkpoints" / "ckpt_00000008.pt"
    final.unlink()
    final.with_name(final.name + ".sha256").unlink()


@pytest.mark.slow
def test_a_checkpoint_from_two_processes_resumes_on_one_and_back(tmp_path, single_run):
    # 2 processes write the step-4 checkpoint, 1 process goes on to step 8
    first = torchrun(2, tmp_path / "two-one", SETTINGS)
    assert first.returncode == 0, first.stdout + first.stderr
    rewind_to_step_4(tmp_path / "two-one")
    run(load_settings(SETTINGS), tmp_path / "two-one")
    assert_same_run(single_run, tmp_path / "two-one")
    # 1 process writes it, 2 processes go on
    run(load_settings(SETTINGS), tmp_path / "one-two")
    rewind_to_step_4(tmp_path / "one-two")
    resumed = torchrun(2, tmp_path / "one-two", SETTINGS)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "ckpt_00000004.pt at step 4" in resumed.stdout
    assert_same_run(single_run, tmp_path / "one-two")
    saved = load_checkpoint(tmp_path / "one-two" / "checkpoints" / "ckpt_00000008.pt")
    assert saved.world_size == 2 and len(saved.process_rngs) == 2


@pytest.mark.slow
def test_a_failing_rank_ends_the_run_with_an_error_instead_of_hanging(tmp_path):
    result = torchrun(2, tmp_path / "out", {**SETTINGS, "train.max_steps": 50}, timeout=180,
                      fail_rank=1, fail_at_step=3)
    assert result.returncode != 0
    assert "injected failure in rank 1 at step 3" in result.stdout + result.stderr  # not a hang: torchrun's timeout
    assert not (tmp_path / "out" / "summary.json").exists()



def start_launcher(out: Path, settings: dict) -> subprocess.Popen:
    """`python -m kernel --set train.devices=2 ...`: the program launches torchrun itself."""
    return subprocess.Popen([sys.executable, "-m", "kernel", *cli_args(out, {**settings, "train.devices": 2})],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_stops_every_process_cleanly_with_a_checkpoint(tmp_path, sent):
    out = tmp_path / "out"
    launcher = start_launcher(out, {**SETTINGS, "train.max_steps": 100_000, "train.checkpoint_interval": 0})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(train_losses(out) if (out / "metrics.jsonl").exists() else {}) < 5:
        time.sleep(0.05)
    launcher.send_signal(sent)
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == f"signal ({sent.name})" and summary["processes"] == 2
    assert (out / "checkpoints" / f"ckpt_{summary['steps']:08d}.pt").exists()
    assert f"[dist] stopped by {sent.name}" in output


@pytest.mark.slow
def test_the_time_budget_stops_every_process_together(tmp_path):
    out = tmp_path / "out"
    result = torchrun(2, out, {**SETTINGS, "train.max_steps": 100_000, "train.time_budget": 8}, step_clock=0.5)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    # Both processes stop after the same step: (8 - 1) s of 0.5 s steps, as one process would.
    assert summary["stopped_by"] == "time_budget" and summary["steps"] == 14 and summary["processes"] == 2
    assert max(train_losses(out)) == 14 and list_checkpoints(out / "checkpoints")[-1].name == "ckpt_00000014.pt"


@pytest.mark.slow
def test_bad_input_in_the_launched_processes_is_reported_in_one_line(tmp_path):
    launcher = start_launcher(tmp_path / "out", {**SETTINGS, "data.text_glob": str(tmp_path / "none" / "*.txt")})
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 2
    assert output.splitlines()[-1] == (f"error: the 2-process training run failed (torchrun exit code 1): "
                                       f"data.text_glob='{tmp_path}/none/*.txt' matches no file; {tmp_path}/none "
                                       "does not exist")


def scaler_worker(rank: int, world_size: int, folder: str) -> None:
    """Three DDP steps with an enabled grad scaler; at step 1 only rank 1's loss is infinite."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
    try:
        config, cpu = tiny_config(), torch.device("cpu")
        torch.manual_seed(0)
        model = build_model(config, 50)
        runner = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = make_optimizer(model, config.train, cpu)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        processes = Processes(rank, rank, world_size, cpu)
        data = torch.Generator().manual_seed(rank)  # each process its own batch
        poisoned = model.lm_head.register_forward_hook(
            lambda module, args, out: out * float("inf") if poison_now else out)
        records = []
        for step in range(3):
            poison_now = step == 1 and rank == 1
            x, y = torch.randint(50, (4, 32), generator=data), torch.randint(50, (4, 32), generator=data)
            before = [p.detach().clone() for p in model.parameters()]
            loss, finite = train_step(runner, optimizer, scaler, [(x[:2], y[:2]), (x[2:], y[2:])], config.train,
                                      cpu, torch.float32, processes)
            updated = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
            records.append({"finite": finite, "scale": scaler.get_scale(), "updated": updated})
        poisoned.remove()
        torch.save({"records": records, "weights": model.state_dict()}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_grad_scaler_skips_a_step_on_every_process_when_one_has_an_infinite_loss(tmp_path):
    torch.multiprocessing.spawn(scaler_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["records"] == rank1["records"] == [
        {"finite": True, "scale": 1024.0, "updated": True},
        {"finite": False, "scale": 512.0, "updated": False},  # skipped everywhere, the scale halved everywhere
        {"finite": True, "scale": 512.0, "updated": True}]
    for name, tensor in rank0["weights"].items():
        assert torch.equal(tensor, rank1["weights"][name])


def test_settings_that_cannot_be_written_into_the_launched_program_are_refused():
    from kernel.distributed import program_source
    with pytest.raises(KernelError, match="must be plain values"):
        program_source({"config": "auto", "overrides": {"data.text_glob": Path("x")}}, {}, "kernel")
    source = program_source({"config": "auto", "overrides": {"train.lr": 0.001}, "out_dir": "o"}, {}, "kernel")
    assert source.endswith("record(main)(**{'config': 'auto', 'overrides': {'train.lr': 0.001}, 'out_dir': 'o'})\n")


def test_how_many_processes_train_devices_asks_for(monkeypatch):
    from kernel.distributed import processes_to_launch
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert processes_to_launch("auto", "auto") == 2  # Kaggle's T4 x2
    assert processes_to_launch("auto", "cuda:1") == 1  # one named GPU
    assert processes_to_launch("auto", "cpu") == 1
    assert processes_to_launch(1, "auto") == 1
    assert processes_to_launch(3, "cpu") == 3
    with pytest.raises(KernelError, match="train.devices=4 but 2 CUDA GPU"):
        processes_to_launch(4, "cuda")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert processes_to_launch("auto", "auto") == 1  # already one of torchrun's processes


@pytest.mark.slow
def test_muon_on_two_processes_follows_the_single_process_run(tmp_path, single_run):
    """Muon's Newton-Schulz step runs on each process's copy of the averaged gradient: the same update."""
    settings = {**SETTINGS, "train.optimizer": "muon"}
    run(load_settings(settings), tmp_path / "one")
    result = torchrun(2, tmp_path / "two", settings)
    assert result.returncode == 0, result.stdout + result.stderr
    # torch's Muon orthogonalises in bfloat16, so the last-bit differences of an averaged gradient become
    # bf16-sized ones in the update: the matrices agree to ~0.5% (AdamW's runs: elementwise 1e-5) while every
    # loss still agrees to 1e-5
    assert_same_run(tmp_path / "one", tmp_path / "two", weights_within=0.02)
    assert train_losses(tmp_path / "one")[8] != train_losses(single_run)[8]  # Muon, not AdamW, took the steps
