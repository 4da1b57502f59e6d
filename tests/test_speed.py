"""Issue 26: Muon's Newton-Schulz in the device's fast format, optimizers without torch._dynamo, nothing heavy
imported before the first step, train.compile=auto, and the bf16 guard on GPUs without bf16 hardware."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernel.optim as optim_module
from kernel.config import ConfigError, load_config
from kernel.env import KernelError, precision_advice, resolve_dtype
from kernel.memory import memory_advice
from kernel.model import build_model
from kernel.optim import (NS_COEFFICIENTS, NS_STEPS, AdamW, Muon, make_optimizer, newton_schulz,
                          newton_schulz_dtype)
from kernel.compiling import COMPILE_COSTS, compile_choice, compile_decision
from kernel.train import nonfinite_error, train_step

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


# --- Newton-Schulz ------------------------------------------------------------------------------------

def reference_iteration(matrix: torch.Tensor) -> torch.Tensor:
    """The quintic iteration written out in float64: X <- a X + b (X X^T) X + c (X X^T)^2 X."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.double() / matrix.double().norm()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if tall else x


def test_the_iteration_is_torchs_quintic():
    muon_module = pytest.importorskip("torch.optim._muon")  # torch >= 2.9: its constants
    assert NS_COEFFICIENTS == (muon_module.DEFAULT_A, muon_module.DEFAULT_B, muon_module.DEFAULT_C)
    assert NS_STEPS == muon_module.DEFAULT_NS_STEPS
    matrix = torch.randn(96, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(newton_schulz(matrix, torch.float64), reference_iteration(matrix), rtol=0, atol=1e-12)


def cpu_supports(dtype: torch.dtype) -> bool:
    try:
        torch.addmm(torch.ones(2, 2, dtype=dtype), torch.ones(2, 2, dtype=dtype), torch.ones(2, 2, dtype=dtype))
        return True
    except RuntimeError:
        return False


# Relative (Frobenius) error against float64 after five iterations: a few machine epsilons of each half
# format (bf16 7.8e-3, fp16 9.8e-4); fp32's is ~1e-6. Measured worst cases: 1.5e-2, 1.9e-3, 1.6e-6.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(128, 128), (384, 128), (128, 352)])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e4])  # a tiny momentum must not underflow in fp16, a large one overflow
def test_newton_schulz_in_each_format_matches_float64(dtype, shape, scale):
    if not cpu_supports(dtype):
        pytest.skip(f"this CPU build has no {dtype} addmm")
    matrix = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * scale
    result = newton_schulz(matrix, dtype)
    reference = newton_schulz(matrix.double(), torch.float64)
    assert result.dtype == dtype and result.shape == matrix.shape and torch.isfinite(result).all()
    error = (result.double() - reference).norm() / reference.norm()
    assert error < TOLERANCE[dtype]
    singular_values = torch.linalg.svdvals(reference)
    assert singular_values.max() < 1.3 and 0.6 < singular_values.median() < 1.2  # near-orthogonal, as Muon's


@pytest.mark.parametrize("capability, expected", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                                  ((7, 5), torch.float16), ((7, 0), torch.float16),
                                                  ((6, 0), torch.float32)])
def test_newton_schulz_takes_the_gpus_tensor_core_format(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    dtype, why = newton_schulz_dtype(torch.device("cuda"))
    assert dtype == expected and f"{capability[0]}.{capability[1]}" in why


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_newton_schulz_on_a_cpu_is_bf16_only_with_native_bf16(monkeypatch, tiny, native, expected):
    monkeypatch.setattr(optim_module, "cpu_has_native_bf16", lambda: native)
    assert newton_schulz_dtype(CPU)[0] == expected
    config = tiny(train__optimizer="muon")
    assert make_optimizer(build_model(config, 65), config.train, CPU).muon.ns_dtype == expected


# --- Muon and AdamW: torch's updates, exact resumes, no torch._dynamo ----------------------------------

def batch(seed: int = 0) -> list:
    tokens = torch.randint(65, (4, 17), generator=torch.Generator().manual_seed(seed))
    return [(tokens[:, :-1], tokens[:, 1:])]


def steps(model, optimizer, config, seeds) -> None:
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for seed in seeds:
        train_step(model, optimizer, scaler, batch(seed), config.train, CPU, torch.float32)


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_muon_state_round_trip_resumes_exactly(tiny, ns_dtype, monkeypatch):
    monkeypatch.setattr(optim_module, "cpu_has_native_bf16", lambda: ns_dtype == torch.bfloat16)
    config = tiny(train__optimizer="muon", model__dropout=0.0)
    torch.manual_seed(0)
    straight = build_model(config, 65)
    resumed = build_model(config, 65)
    straight_opt = make_optimizer(straight, config.train, CPU)
    steps(straight, straight_opt, config, range(3))
    saved_model = {k: v.clone() for k, v in straight.state_dict().items()}
    saved_opt = torch.load(_through_bytes(straight_opt.state_dict()), weights_only=True)  # as a checkpoint holds it
    steps(straight, straight_opt, config, range(3, 6))
    resumed.load_state_dict(saved_model)
    resumed_opt = make_optimizer(resumed, config.train, CPU)
    resumed_opt.load_state_dict(saved_opt)
    steps(resumed, resumed_opt, config, range(3, 6))
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    for part in ("muon", "adamw"):
        a, b = straight_opt.state_dict()[part], resumed_opt.state_dict()[part]
        assert a["param_groups"] == b["param_groups"]
        assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])


def _through_bytes(state: dict):
    import io
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_muon_is_torchs_update_with_the_iteration_in_the_chosen_format(tiny, monkeypatch):
    """With torch's Newton-Schulz swapped for ours in fp32, torch.optim.Muon and ours step bit for bit alike
    (momentum, Nesterov, weight decay, match_rms_adamw); their state dicts load into each other."""
    muon_module = pytest.importorskip("torch.optim._muon")
    monkeypatch.setattr(muon_module, "_zeropower_via_newtonschulz",
                        lambda grad, coefficients, ns_steps, eps: newton_schulz(grad, torch.float32, ns_steps,
                                                                                coefficients, eps))
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(48, 16)), torch.nn.Parameter(torch.randn(16, 16))]
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    ours = Muon(weights, lr=0.01, weight_decay=0.1, momentum=0.95, ns_dtype=torch.float32)
    theirs = torch.optim.Muon(copies, lr=0.01, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    step_both(ours, theirs, weights, copies, steps=4)
    ours.load_state_dict(theirs.state_dict())  # a checkpoint written with torch.optim.Muon resumes here
    theirs.load_state_dict(ours.state_dict())
    assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]


def step_both(ours, theirs, weights: list, copies: list, steps: int) -> None:
    """The same gradients into both optimizers, `steps` times; their weights must stay equal bit for bit."""
    for step in range(steps):
        for w, c in zip(weights, copies):
            w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(step))
            c.grad = w.grad.clone()
        ours.step()
        theirs.step()
    assert all(torch.equal(w, c) for w, c in zip(weights, copies))


def test_adamw_steps_exactly_as_torchs():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    ours = AdamW(weights, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, fused=True)
    theirs = torch.optim.AdamW(copies, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, fused=True)
    step_both(ours, theirs, weights, copies, steps=3)
    assert str(ours.state_dict()) == str(theirs.state_dict())


# --- Setup: nothing imported that the first step does not need -----------------------------------------

def fresh_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


HEAVY = ["matplotlib", "transformers", "huggingface_hub", "safetensors", "torch._dynamo"]


def test_importing_the_program_loads_no_plotting_export_or_compiler():
    out = fresh_python("import sys, torch\nprint('torch:', 'torch._dynamo' in sys.modules)\nimport kernel.main\n"
                       f"print([m for m in {HEAVY!r} if m in sys.modules])")
    assert out.splitlines() == ["torch: False", "[]"]  # import torch itself leaves the compiler out too


def test_a_run_reaches_its_first_step_without_them(tmp_path):
    """Until the first training step (optimizer built, memory estimated on the meta device, data and model
    ready) none of them is imported; matplotlib and transformers come after training, for the outputs."""
    out = fresh_python(f"""
import sys
import kernel.train as train_module
from kernel.main import run
from tests.conftest import tiny_config
original, seen = train_module.train_step, []
def first_step(*args, **kwargs):
    seen.append([m for m in {HEAVY!r} if m in sys.modules] if not seen else None)
    return original(*args, **kwargs)
train_module.train_step = first_step
run(tiny_config(train__optimizer="muon", train__max_steps=2, train__compile="auto"), {str(tmp_path)!r})
print("before the first step:", seen[0])
""")
    assert "before the first step: []" in out
    assert "[train] compile: off (train.compile=auto: " in out


# --- train.compile: auto ------------------------------------------------------------------------------

def test_compile_pays_on_a_gpu_for_a_long_budget_and_not_for_minutes():
    assert compile_decision("cuda", 8 * 3600, float("inf"), None)[0]
    assert compile_decision("cuda", 30 * 60, float("inf"), None)[0]
    on, why = compile_decision("cuda", 120, float("inf"), None)
    assert not on and "2 min of training" in why


def test_compile_on_a_cpu_needs_time_for_its_cost_to_come_back():
    cost = COMPILE_COSTS["cpu"]
    assert not compile_decision("cpu", 64, float("inf"), None)[0]  # the 64 s benchmark: 15 s saved, 18 s paid
    assert not compile_decision("cpu", None, 1150, 0.05)[0]        # the README's CPU run: ~1 min
    assert compile_decision("cpu", 3600, float("inf"), None)[0]     # an hour repays 18 s many times
    threshold = 2 * cost.seconds / cost.step_saving
    assert not compile_decision("cpu", threshold * 0.99, float("inf"), None)[0]
    assert compile_decision("cpu", threshold * 1.01, float("inf"), None)[0]


def test_the_step_count_can_end_training_before_the_budget():
    on, why = compile_decision("cuda", 8 * 3600, 200, 0.1)  # gpu_check.sh's 200 steps of the T4 preset
    assert not on and "20s of training" in why
    assert compile_decision("cuda", None, 100_000, 0.1)[0]  # no budget: steps x step time
    assert not compile_decision("cuda", None, float("inf"), None)[0]  # nothing known: off
    assert not compile_decision("mps", 8 * 3600, float("inf"), None)[0]  # no measured cost


def test_compile_setting_true_false_auto(monkeypatch):
    assert compile_choice(False, CPU, 3600, float("inf"), None) == (False, "train.compile=false")
    monkeypatch.setattr("kernel.compiling.compile_blocker", lambda device: None)
    assert compile_choice(True, CPU, 60, 10, 0.1) == (True, "train.compile=true")
    assert compile_choice("auto", CPU, 3600, float("inf"), None)[0]
    monkeypatch.setattr("kernel.compiling.compile_blocker", lambda device: "no C++ compiler found")
    on, why = compile_choice("auto", CPU, 3600, float("inf"), None)
    assert not on and why == "train.compile=auto, but no C++ compiler found"


def test_compile_auto_is_a_config_value_and_the_gpu_presets_choice():
    assert load_config("llm_kaggle_t4.yaml").train.compile == "auto"
    assert load_config("llm_cpu.yaml").train.compile is False  # the README's 1-minute run: off either way
    assert load_config("llm_cpu.yaml", {"train.compile": "auto"}).train.compile == "auto"
    assert load_config("llm_cpu.yaml", {"train.compile": True}).train.compile is True
    with pytest.raises(ConfigError, match="expected true, false or auto"):
        load_config("llm_cpu.yaml", {"train.compile": "yes please"})


# --- bf16 on GPUs without bf16 hardware ----------------------------------------------------------------

def a_gpu(monkeypatch, capability: tuple[int, int], name: str = "Tesla T4") -> torch.device:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return torch.device("cuda")


def test_explicit_bf16_on_a_t4_is_refused_naming_fp16_and_the_scaler(monkeypatch):
    device = a_gpu(monkeypatch, (7, 5))
    with pytest.raises(KernelError, match=r"bfloat16 on Tesla T4 \(compute capability 7.5\).*no bf16 hardware"
                                          r".*train.dtype=float16 \(with the grad scaler"):
        resolve_dtype("bfloat16", device)
    assert resolve_dtype("auto", device)[0] == torch.float16
    assert resolve_dtype("float16", device)[0] == torch.float16


def test_a_run_asking_for_bf16_on_a_t4_stops_before_reading_data(monkeypatch, tiny, tmp_path):
    from kernel.distributed import Processes
    from kernel.main import prepare_run
    with pytest.raises(KernelError, match="no bf16 hardware"):
        prepare_run(tiny(train__dtype="bfloat16"), tmp_path, Processes(), a_gpu(monkeypatch, (7, 5)))
    assert not any(tmp_path.iterdir())  # no token cache, no config.yaml


def test_explicit_bf16_on_a_pascal_gpu_points_to_float32(monkeypatch):
    with pytest.raises(KernelError, match=r"Use train.dtype=float32"):
        resolve_dtype("bfloat16", a_gpu(monkeypatch, (6, 0), "Tesla P100-PCIE-16GB"))


def test_explicit_bf16_on_an_ampere_gpu_is_taken(monkeypatch):
    assert resolve_dtype("bfloat16", a_gpu(monkeypatch, (8, 0), "NVIDIA A100"))[0] == torch.bfloat16


def test_a_bf16_checkpoint_resumed_on_a_t4_says_it_is_emulated(monkeypatch):
    dtype, why = resolve_dtype("auto", a_gpu(monkeypatch, (7, 5)), resumed="bfloat16")
    assert dtype == torch.bfloat16 and "emulated" in why


def test_advice_on_a_t4_names_fp16_with_the_scaler_not_bf16(monkeypatch, tiny, tmp_path):
    device = a_gpu(monkeypatch, (7, 5))
    config = tiny()
    nan = str(nonfinite_error(config.train, 30, tmp_path, device, torch.float16))
    assert "bfloat16" not in nan.replace("no bf16", "") and "train.dtype=float32" in nan and "grad scaler" in nan
    memory = memory_advice(config, device, torch.float32)
    assert "train.dtype=float16 (with a grad scaler" in memory and "bfloat16" not in memory
    ampere = a_gpu(monkeypatch, (8, 6), "NVIDIA A10")
    assert "train.dtype=bfloat16 or float32 instead of float16" in precision_advice(ampere, torch.float16)
    assert "train.dtype=bfloat16 halves" in memory_advice(config, ampere, torch.float32)
    assert precision_advice(CPU, torch.float32) == ""
    assert "train.dtype=float32" in precision_advice(CPU, torch.bfloat16)


# --- bench/gpu.py, the Python half of bench/gpu_check.sh, on the CPU ------------------------------------------

@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_llama_settings_and_attention_report_on_a_cpu():
    import json
    lines = fresh_python("import runpy, sys\nsys.argv = ['gpu.py', '--smoke', '--arch', 'llama', '--settings', "
                         "'bf16,fp32+muon,fp16,bf16+compile']\nrunpy.run_path('bench/gpu.py', run_name='__main__')")
    results = [json.loads(line) for line in lines.splitlines()]
    assert [r["setting"] for r in results] == ["bf16", "fp32+muon"]  # fp16 and compiling: GPU settings
    assert all(r["arch"] == "llama" and r["tokens_per_s"] > 0 and r["memory_estimate_gib"] > 0 for r in results)
    assert 0 < results[1]["muon_share_of_step"] < 1 and results[1]["newton_schulz"] in ("float32", "bfloat16")
    report = json.loads(fresh_python("import runpy, sys\nsys.argv = ['gpu.py', '--smoke', '--sdpa']\n"
                                     "runpy.run_path('bench/gpu.py', run_name='__main__')").splitlines()[-1])["sdpa"]
    assert report["backends"]["MATH"] == "runs" and any("scaled_dot_product" in op for op in report["ops_that_ran"])
