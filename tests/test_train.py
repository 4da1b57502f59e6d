import json
import math
import shutil

import pytest
import torch

from kernel.config import TrainConfig, load_config
from kernel.env import KernelError, resolve_dtype
import kernel.main as main_module
from kernel.main import run
from kernel.checkpoint import find_resume_checkpoint, list_checkpoints, load_checkpoint
from tests.conftest import StepClock
from kernel.model import build_model
from kernel.compiling import compile_blocker
from kernel.train import train_step
from kernel.optim import lr_at, make_optimizer
from kernel.sample import final_samples


def test_lr_schedule_values():
    t = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=1100)
    assert lr_at(0, t) == pytest.approx(1e-5)         # warm-up starts near zero
    assert lr_at(49, t) == pytest.approx(5e-4)        # and rises linearly
    assert lr_at(99, t) == pytest.approx(1e-3)        # peak at the end of warm-up
    assert lr_at(100, t) == pytest.approx(1e-3)
    assert lr_at(600, t) == pytest.approx(5.5e-4)     # half way through the cosine: the midpoint
    assert lr_at(1100, t) == pytest.approx(1e-4)      # the floor at max_steps
    assert lr_at(5000, t) == pytest.approx(1e-4)      # and after
    decay = [lr_at(s, t) for s in range(100, 1101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_k_micro_batches_equal_one_big_batch(tiny):
    config = tiny(train__batch_size=8)
    torch.manual_seed(0)
    x, y = torch.randint(50, (8, 32)), torch.randint(50, (8, 32))
    results = []
    for accum in (1, 4):
        torch.manual_seed(1)
        model = build_model(config, 50)
        settings = TrainConfig(**{**vars(config.train), "grad_accum_steps": accum, "batch_size": 8 // accum})
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is the (clipped) gradient itself
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        chunks = [(x[i:i + 8 // accum], y[i:i + 8 // accum]) for i in range(0, 8, 8 // accum)]
        loss, finite = train_step(model, optimizer, scaler, chunks, settings, torch.device("cpu"), torch.float32)
        assert finite
        results.append((loss.item(), [p.detach().clone() for p in model.parameters()]))
    (loss_one, params_one), (loss_four, params_four) = results
    assert loss_one == pytest.approx(loss_four, rel=1e-5)
    for a, b in zip(params_one, params_four):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_weight_decay_applies_to_matrices_only(tiny):
    model = build_model(tiny(), 50)
    decay, no_decay = make_optimizer(model, tiny().train, torch.device("cpu")).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                                  ((9, 0), torch.bfloat16), ((6, 0), torch.float32)])
def test_dtype_follows_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    dtype, why = resolve_dtype("auto", torch.device("cuda"))
    assert dtype == expected and f"{capability[0]}.{capability[1]}" in why


def test_dtype_on_cpu_and_overrides():
    assert resolve_dtype("auto", torch.device("cpu"))[0] == torch.float32  # width 0: never bf16
    assert resolve_dtype("bfloat16", torch.device("cpu"))[0] == torch.bfloat16
    with pytest.raises(KernelError, match="float16 needs a CUDA GPU"):
        resolve_dtype("float16", torch.device("cpu"))


def test_compile_is_refused_where_it_cannot_work(monkeypatch):
    monkeypatch.setattr("sys.platform", "win32")
    assert "Windows" in compile_blocker(torch.device("cpu"))


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_short_run_learns_and_writes_every_output(tmp_path, tiny):
    out = tmp_path / "out"
    summary = run(tiny(train__max_steps=200, train__eval_interval=100, train__lr=3e-3), out)
    vocab = summary["data"]["vocab_size"]
    assert summary["val_loss"] < 0.65 * math.log(vocab)  # well below a uniform guess
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))
    assert summary["steps"] == 200 and summary["tokens"] == 200 * 8 * 32
    for key in ("tokens_per_s", "wall_s", "params", "device", "dtype", "val_bpb"):
        assert key in summary
    assert summary["device"] == "cpu" and summary["dtype"] == "float32" and summary["tokens_per_s"] > 0
    assert 0 < summary["mfu"] < 1 and summary["flops_per_token"] > 0
    assert json.loads((out / "summary.json").read_text())["val_loss"] == summary["val_loss"]
    metrics = read_metrics(out)
    train_lines = [m for m in metrics if "train_loss" in m]
    eval_lines = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in eval_lines] == [0, 100, 200]
    assert eval_lines[-1]["val_loss"] < eval_lines[0]["val_loss"] - 1.0
    assert {"step", "tokens", "train_loss", "lr", "tokens_per_s", "elapsed_s", "mfu"} <= set(train_lines[0])
    samples = (out / "samples.txt").read_text()  # a short sample at each evaluation, then the final samples
    assert samples.startswith("=== step 0 | prompt '\\n' ===\n") and "\n=== step 100 |" in samples
    assert "\n=== step 200 |" in samples and final_samples(samples).startswith("=== sample 1 | prompt")
    assert load_config(str(out / "config.yaml")) == load_config(str(out / "checkpoints" / "config.yaml"))
    checkpoints = list_checkpoints(out / "checkpoints")
    assert [p.name for p in checkpoints] == ["ckpt_00000180.pt", "ckpt_00000200.pt"]  # keep_checkpoints=2
    saved = torch.load(checkpoints[-1], weights_only=True)  # what is on disk, read without our loader
    assert {"model", "optimizer", "scaler", "sampler", "process_rngs", "config", "tokenizer", "step"} <= set(saved)
    assert (out / "tokenizer" / "tokenizer.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])  # muon: both optimizers' states in one checkpoint
def test_resuming_after_a_stop_matches_the_straight_run(tmp_path, tiny, optimizer):
    config = tiny(train__max_steps=60, train__checkpoint_interval=30, train__keep_checkpoints=5,
                  model__dropout=0.1, train__optimizer=optimizer)  # dropout: the torch RNG state must be restored too
    straight = run(config, tmp_path / "straight")
    # Simulate a run stopped after step 30: keep only what existed then.
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "straight", stopped)
    (stopped / "checkpoints" / "ckpt_00000060.pt").unlink()
    resumed = run(config, stopped)
    assert resumed["resumed_from"].endswith("ckpt_00000030.pt")
    assert resumed["val_loss"] == straight["val_loss"]
    assert resumed["train_loss"] == straight["train_loss"]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("elapsed_s", "train_seconds_total", "tokens_per_s", "mfu")} for r in rows]
    assert strip(read_metrics(stopped)) == strip(read_metrics(tmp_path / "straight"))
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "ckpt_00000060.pt").model
    b = load_checkpoint(stopped / "checkpoints" / "ckpt_00000060.pt").model
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_refuses_a_different_model_shape(tmp_path, tiny):
    run(tiny(train__max_steps=20), tmp_path)
    with pytest.raises(KernelError, match=r"model.n_layer: 2 -> 3"):
        run(tiny(train__max_steps=40, model__n_layer=3), tmp_path)


def test_resume_paths(tmp_path):
    assert find_resume_checkpoint("never", tmp_path) is None
    assert find_resume_checkpoint("auto", tmp_path) is None
    with pytest.raises(KernelError, match="no such checkpoint"):
        find_resume_checkpoint(str(tmp_path / "nope.pt"), tmp_path)
    with pytest.raises(KernelError, match="holds no checkpoint"):
        find_resume_checkpoint(str(tmp_path), tmp_path)


def test_time_budget_stops_cleanly_with_outputs(tmp_path, tiny, monkeypatch):
    clock = StepClock(seconds_per_step=0.125).install(monkeypatch.setattr)  # exact in binary: no rounding
    summary = run(tiny(train__max_steps=100_000, train__time_budget=3), tmp_path, now=clock)
    # 1 s is kept to finish (evaluations and checkpoints take no time on this clock): 2 s of 0.125 s steps
    assert summary["stopped_by"] == "time_budget" and summary["steps"] == 16
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == f"ckpt_{summary['steps']:08d}.pt"
    assert read_metrics(tmp_path)[-1]["step"] == summary["steps"] and "val_loss" in read_metrics(tmp_path)[-1]
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "loss.png").is_file()
    assert "=== sample 1 |" in (tmp_path / "samples.txt").read_text()


def test_checkpoints_by_duration_follow_the_trainers_clock_and_hold_no_metrics_history(tmp_path, tiny, monkeypatch):
    clock = StepClock(seconds_per_step=1.0).install(monkeypatch.setattr)
    run(tiny(train__max_steps=20, train__checkpoint_interval="5s", train__keep_checkpoints=10), tmp_path, now=clock)
    # due once 5 s have passed since the last checkpoint (agreed before a step), saved after that step
    steps = [load_checkpoint(p).step for p in list_checkpoints(tmp_path / "checkpoints")]
    assert steps == [6, 12, 18, 20]
    payload = torch.load(list_checkpoints(tmp_path / "checkpoints")[-1], weights_only=True)
    assert payload["format"] == 3 and "metrics" not in payload  # metrics.jsonl is the record
    assert load_config(str(tmp_path / "config.yaml")).train.checkpoint_interval == "5s"


@pytest.mark.slow
def test_a_bpe_run_learns_exports_its_tokenizer_and_resumes(tmp_path, tiny):
    from transformers import AutoTokenizer

    config = tiny(tokenizer__mode="bpe_simple", tokenizer__vocab_size=512, train__max_steps=40,
                  train__checkpoint_interval=20, train__keep_checkpoints=3)
    straight = run(config, tmp_path / "straight")
    assert straight["data"]["vocab_size"] == 512 and straight["val_loss"] < math.log(512)
    assert straight["val_bpb"] == pytest.approx(
        straight["val_loss"] / math.log(2) * straight["data"]["val_tokens"] / straight["data"]["val_bytes"])
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "straight" / "tokenizer"), local_files_only=True)
    assert hf.eos_token == "<|endoftext|>" and len(hf) == 512
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "straight", stopped)
    (stopped / "checkpoints" / "ckpt_00000040.pt").unlink()
    shutil.rmtree(stopped / "cache")  # the resumed run re-tokenizes with the checkpoint's tokenizer
    resumed = run(config, stopped)
    assert resumed["val_loss"] == straight["val_loss"]


@pytest.mark.slow
def test_a_llama_run_learns(tmp_path, tiny):
    summary = run(tiny(model__arch="llama", model__qk_norm=True, train__max_steps=150, train__lr=3e-3), tmp_path)
    assert summary["val_loss"] < 0.7 * math.log(summary["data"]["vocab_size"])
    from transformers import AutoModelForCausalLM
    assert type(AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))).__name__ == "Qwen3ForCausalLM"


def test_wsd_schedule_and_the_decay_stretched_to_a_time_budget():
    t = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=1100, schedule="wsd", decay_fraction=0.2)
    assert lr_at(99, t) == pytest.approx(1e-3)
    assert lr_at(800, t) == pytest.approx(1e-3)               # stable until 80% of the decay phase
    assert lr_at(1000, t) == pytest.approx(1e-3 - 0.5 * 9e-4)   # half way through the final 20%
    assert lr_at(1100, t) == pytest.approx(1e-4)
    # With a budget, whichever ends first ends the decay: at 90% of the time, step 200 is already decaying.
    assert lr_at(200, t, time_progress=0.9) == pytest.approx(1e-3 - 0.5 * 9e-4)
    assert lr_at(200, t, time_progress=1.0) == pytest.approx(1e-4)
    cosine = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=10**9)
    assert lr_at(150, cosine, time_progress=0.5) == pytest.approx(5.5e-4)  # the budget's midpoint
    assert lr_at(150, cosine, time_progress=0.0) == pytest.approx(1e-3, rel=1e-6)


def test_a_budgeted_run_lands_its_decay_at_the_end(tmp_path, tiny, monkeypatch):
    clock = StepClock(seconds_per_step=0.0625).install(monkeypatch.setattr)
    summary = run(tiny(train__max_steps=10**9, train__time_budget=4, train__schedule="wsd",
                       train__warmup_steps=5, train__log_interval=1), tmp_path, now=clock)
    rates = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if '"lr"' in line]
    assert summary["stopped_by"] == "time_budget" and summary["steps"] == 48  # (4 - 1) s / 0.0625 s
    assert rates[len(rates) // 2] == pytest.approx(tiny().train.lr)  # stable in the middle
    assert rates[-1] < 0.5 * tiny().train.lr  # decayed by the end of the budget


@pytest.mark.slow
def test_a_budgeted_wsd_run_goes_on_from_its_stable_phase_in_the_next_session(tmp_path, tiny, monkeypatch, capsys):
    settings = tiny(train__max_steps="auto", train__time_budget=4, train__schedule="wsd", train__warmup_steps=5,
                    train__decay_fraction=0.2, train__log_interval=1, train__checkpoint_interval=0)
    first = run(settings, tmp_path, now=StepClock(seconds_per_step=0.0625).install(monkeypatch.setattr))
    # 3 s of training: the decay takes the last 20%, from step 39 (39 x 0.0625 s > 0.8 x 3 s)
    assert first["stopped_by"] == "time_budget" and first["steps"] == 48
    stable, final = (load_checkpoint(p) for p in list_checkpoints(tmp_path / "checkpoints"))
    assert (stable.step, stable.lr_phase) == (39, "stable") and (final.lr_phase, final.stable_step) == ("budget_decay", 39)
    second = run(settings, tmp_path, now=StepClock(seconds_per_step=0.0625).install(monkeypatch.setattr))
    assert "ends a time budget's learning-rate decay: continuing the stable phase from ckpt_00000039.pt" in \
        capsys.readouterr().out
    assert second["resumed_from"].endswith("ckpt_00000039.pt") and second["steps"] == 39 + 48
    rows = [r for r in read_metrics(tmp_path) if "lr" in r]
    assert [r["step"] for r in rows] == list(range(1, 88))  # one curve: version 1's decay branch is dropped
    assert rows[39]["lr"] == pytest.approx(settings.train.lr)  # step 40 trains at the peak rate again
    assert rows[-1]["lr"] < 0.5 * settings.train.lr  # and the second session decays at its own end
    assert load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1]).stable_step == 39 + 39


def test_max_steps_auto_needs_a_time_budget(tmp_path, tiny):
    with pytest.raises(KernelError, match=r"train.max_steps=auto trains for as long as train.time_budget allows"):
        run(tiny(train__max_steps="auto"), tmp_path)


def test_a_budget_spent_before_the_first_step_is_an_error_naming_the_setup_time(tmp_path, tiny, monkeypatch):
    clock = StepClock()
    original_prepare = main_module.prepare_run

    def slow_setup(*args, **kwargs):  # setup "takes" 5 s of a 3 s budget
        clock.seconds += 5
        return original_prepare(*args, **kwargs)

    monkeypatch.setattr(main_module, "prepare_run", slow_setup)
    with pytest.raises(KernelError, match=r"used up before the first training step: setup .* took 5\.0s of the "
                                          r"3\.0s budget.*Raise train.time_budget"):
        run(tiny(train__max_steps=100, train__time_budget=3), tmp_path, now=clock.install(monkeypatch.setattr))
    assert not list_checkpoints(tmp_path / "checkpoints") and not (tmp_path / "summary.json").exists()
    assert not (tmp_path / "hf").exists()


def test_a_budget_smaller_than_the_end_of_run_reserve_is_refused_before_any_data_is_read(tmp_path, tiny,
                                                                                         monkeypatch):
    with pytest.raises(KernelError, match=r"train.time_budget=0.5s is spent before the run can start"):
        run(tiny(train__max_steps=100, train__time_budget=0.5), tmp_path, now=StepClock().install(monkeypatch.setattr))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # no cache, no config.yaml, nothing


@pytest.mark.parametrize("native, width, expected", [(True, 256, torch.bfloat16), (True, 128, torch.float32),
                                                     (False, 512, torch.float32)])
def test_auto_dtype_on_cpu_is_a_fixed_rule_of_the_chip_and_the_model_width(monkeypatch, native, width, expected):
    import kernel.env as env_module
    monkeypatch.setattr(env_module, "cpu_has_native_bf16", lambda: native)
    for _ in range(3):  # no timing: the same answer every time, however busy the machine
        dtype, why = resolve_dtype("auto", torch.device("cpu"), width)
        assert dtype == expected and ("native bf16" in why)


def test_an_explicit_dtype_wins_over_the_rule(tmp_path, tiny, monkeypatch):
    import kernel.env as env_module
    monkeypatch.setattr(env_module, "cpu_has_native_bf16", lambda: True)
    assert run(tiny(train__dtype="float32", train__max_steps=5, model__n_embd=256, model__n_head=4),
               tmp_path)["dtype"] == "float32"


@pytest.mark.slow
def test_auto_dtype_on_cpu_follows_the_rule_and_a_resumed_run_keeps_its_precision(tmp_path, tiny, monkeypatch):
    import kernel.env as env_module
    monkeypatch.setattr(env_module, "cpu_has_native_bf16", lambda: True)
    wide = dict(train__dtype="auto", model__n_embd=256, model__n_head=4)
    first = run(tiny(train__max_steps=10, **wide), tmp_path)
    assert first["dtype"] == "bfloat16"
    monkeypatch.setattr(env_module, "cpu_has_native_bf16", lambda: False)  # the rule would now say fp32
    assert run(tiny(train__max_steps=20, **wide), tmp_path)["dtype"] == "bfloat16"


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tiny):
    from kernel.optim import Muon, MuonWithAdamW, make_optimizer
    from kernel.model import build_model
    config = tiny(train__optimizer="muon")
    model = build_model(config, vocab_size=65)
    optimizer = make_optimizer(model, config.train, torch.device("cpu"))
    assert isinstance(optimizer, MuonWithAdamW) and isinstance(optimizer.muon, Muon)
    hidden = {id(p) for p in optimizer.muon.param_groups[0]["params"]}
    expected = {id(m.weight) for block in model.transformer.h for m in block.modules() if isinstance(m, torch.nn.Linear)}
    assert hidden == expected and id(model.transformer.wte.weight) not in hidden
    everything = [p for group in optimizer.param_groups for p in group["params"]]
    assert sorted(map(id, everything)) == sorted(id(p) for p in model.parameters())  # each parameter once


def test_muon_needs_no_torch_optim_muon(tiny, monkeypatch):
    """The program's own Muon: a torch older than 2.9 (no torch.optim.Muon) trains with it too."""
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    config = tiny(train__optimizer="muon")
    model = build_model(config, vocab_size=65)
    optimizer = make_optimizer(model, config.train, torch.device("cpu"))
    tokens = torch.randint(65, (4, 17), generator=torch.Generator().manual_seed(0))
    before = model.transformer.h[0].mlp.c_proj.weight.detach().clone()
    train_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), [(tokens[:, :-1], tokens[:, 1:])],
               config.train, torch.device("cpu"), torch.float32)
    assert not torch.equal(before, model.transformer.h[0].mlp.c_proj.weight)


def test_resume_refuses_another_optimizer(tmp_path, tiny):
    run(tiny(train__max_steps=10), tmp_path)
    with pytest.raises(KernelError, match=r"train.optimizer changed \('adamw' -> 'muon'\)"):
        run(tiny(train__max_steps=20, train__optimizer="muon"), tmp_path)


def test_the_grad_scaler_drives_muon_and_adamw_together(tiny):
    """fp16's scaler unscales, checks and steps both optimizers through the pair's param_groups and step."""
    from kernel.model import build_model
    from kernel.optim import make_optimizer
    from kernel.train import train_step
    config = tiny(train__optimizer="muon")
    model = build_model(config, vocab_size=65)
    optimizer = make_optimizer(model, config.train, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    tokens = torch.randint(65, (4, 17), generator=torch.Generator().manual_seed(0))
    batch = [(tokens[:, :-1], tokens[:, 1:])]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_step(model, optimizer, scaler, batch, config.train, torch.device("cpu"), torch.float32)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.dim() == 2)  # both stepped
    stepped = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.transformer.h[0].mlp.c_proj.weight.register_hook(lambda grad: grad * float("inf"))
    train_step(model, optimizer, scaler, batch, config.train, torch.device("cpu"), torch.float32)
    assert all(torch.equal(stepped[n], p) for n, p in model.named_parameters())  # skipped by both
    assert scaler.get_scale() == 2.0**9


# --- One story across sessions (notebook versions) -----------------------------------------------------

def test_after_a_resume_the_summary_card_and_curves_cover_every_session(tmp_path, tiny, monkeypatch):
    clock = StepClock(seconds_per_step=1.0).install(monkeypatch.setattr)  # training time = steps, exactly
    run(tiny(train__max_steps=20), tmp_path, now=clock)
    summary = run(tiny(train__max_steps=30), tmp_path, now=StepClock(1.0).install(monkeypatch.setattr))
    tokens_per_step = 8 * 32
    assert (summary["steps"], summary["tokens"], summary["train_seconds"]) == (30, 30 * tokens_per_step, 30.0)
    assert [(s["started_step"], s["ended_step"], s["tokens"], s["train_seconds"], s["stopped_by"])
            for s in summary["sessions"]] == [(0, 20, 20 * tokens_per_step, 20.0, "max_steps"),
                                              (20, 30, 10 * tokens_per_step, 10.0, "max_steps")]
    assert summary["tokens_per_s"] == tokens_per_step  # one step a second, over both sessions
    times = [r["train_seconds_total"] for r in read_metrics(tmp_path)]
    assert times == sorted(times) and times[-1] == 30.0  # the curve's time axis never runs backwards
    # a version with nothing left to train keeps the story: no session added, no 0 tokens/s
    again = run(tiny(train__max_steps=30), tmp_path, now=StepClock(1.0).install(monkeypatch.setattr))
    assert {k: again[k] for k in ("steps", "tokens", "train_seconds", "tokens_per_s", "sessions")} == \
        {k: summary[k] for k in ("steps", "tokens", "train_seconds", "tokens_per_s", "sessions")}
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "30 s of training over 2 sessions" in card and "| session 2 | steps 20 to 30, 2,560 tokens in 10 s" in card
    from kernel.report import plot_losses
    figure = plot_losses(read_metrics(tmp_path), tmp_path / "check.png", "run", summary["sessions"])
    assert figure._suptitle.get_text().endswith("| 2 sessions")


def test_sessions_a_resumed_checkpoint_stands_for():
    from types import SimpleNamespace
    from kernel.checkpoint import earlier_sessions

    running = {"started_step": 0, "ended_step": 50, "tokens": 800, "train_seconds": 9.0, "step_seconds": 8.0,
               "stopped_by": None}
    killed = SimpleNamespace(sessions=[running], step=50, tokens=800, lr_phase="")
    assert earlier_sessions(killed)[0]["stopped_by"].startswith("interrupted")
    assert running["stopped_by"] is None  # the checkpoint's own list is left as it was
    stable = SimpleNamespace(sessions=[running], step=50, tokens=800, lr_phase="stable")
    assert earlier_sessions(stable)[0]["stopped_by"] == "continued from its stable phase"
    old = SimpleNamespace(sessions=[], step=50, tokens=800, lr_phase="")  # written before sessions were kept
    assert earlier_sessions(old) == [{"started_step": 0, "ended_step": 50, "tokens": 800, "train_seconds": None,
                                      "step_seconds": None, "stopped_by": "interrupted (continued from its last "
                                                                           "checkpoint)"}]


def test_a_budget_whose_warm_up_runs_into_the_decay_still_saves_a_stable_phase_checkpoint(tmp_path, tiny,
                                                                                       monkeypatch):
    clock = StepClock(seconds_per_step=1.0).install(monkeypatch.setattr)
    # 13 s budget, 1 s kept to finish: 12 steps; the decay's last 20% begins at 9.6 s, inside the 11 warm-up steps
    summary = run(tiny(train__max_steps="auto", train__time_budget=13, train__schedule="wsd", train__warmup_steps=11,
                       train__checkpoint_interval=0, train__keep_checkpoints=5), tmp_path, now=clock)
    assert summary["steps"] == 12
    stable, final = (load_checkpoint(p) for p in list_checkpoints(tmp_path / "checkpoints"))
    assert (stable.step, stable.lr_phase) == (11, "stable")  # the end of warm-up: where the decay starts
    assert (final.lr_phase, final.stable_step) == ("budget_decay", 11)
