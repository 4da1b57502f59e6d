"""The planner: its law, and its choice on a mocked throughput table (no timing: a fake clock)."""

import math

import pytest
import torch

import kernel.plan as plan_module
from kernel.config import load_config
from kernel.env import KernelError
from kernel.memory import NAMED_DEVICES
from kernel.plan import LADDER, ladder, plan_model, predicted_loss

CPU = torch.device("cpu")
AUTO = {"model.size": "auto", "train.max_steps": "auto"}  # the budget, not a step count, bounds the training


class FakeClock:
    """Time passes only when a candidate is measured: `seconds_per_measure` each."""

    def __init__(self, seconds_per_measure: float):
        self.seconds, self.step = 0.0, seconds_per_measure

    def __call__(self) -> float:
        return self.seconds


def mocked_throughput(monkeypatch, clock: FakeClock, flop_rate: float, measured: list) -> None:
    """Every shape runs at the same FLOP rate (tokens/s = rate / FLOPs per token); each measurement costs time."""
    def measure(config, candidate, vocab_size, device, processes=1, now=None):
        clock.seconds += clock.step
        measured.append(candidate.shape)
        return flop_rate / candidate.flops_per_token

    monkeypatch.setattr(plan_module, "measure_tokens_per_s", measure)


def test_the_law_rewards_tokens_and_parameters_and_repeating_data_buys_little():
    unique = 1e6
    assert predicted_loss(1e6, 4e6, 1e8) < predicted_loss(1e6, 1e6, 1e8)  # more tokens: lower
    assert predicted_loss(4e6, 1e7, 1e8) < predicted_loss(1e6, 1e7, 1e8)  # more parameters: lower
    assert predicted_loss(1e6, 8 * unique, unique) > predicted_loss(1e6, 8 * unique, 8 * unique)  # repeats < fresh
    first_epochs = predicted_loss(1e6, unique, unique) - predicted_loss(1e6, 4 * unique, unique)
    far_epochs = predicted_loss(1e6, 40 * unique, unique) - predicted_loss(1e6, 400 * unique, unique)
    assert far_epochs < 0.1 * first_epochs  # the value of repeating saturates
    # parameters beyond what the unique tokens can fill help less than the same factor below that point
    assert (predicted_loss(4e5, 1e8, unique) - predicted_loss(4e6, 1e8, unique)
            < predicted_loss(4e4, 1e8, unique) - predicted_loss(4e5, 1e8, unique))


def test_the_ladder_grows_and_has_the_cpu_presets_shape():
    config = load_config("llm_cpu.yaml")
    candidates = ladder(config, vocab_size=65)
    assert [(c.n_layer, c.n_embd) for c in candidates] == LADDER
    assert all(a.params < b.params and a.flops_per_token < b.flops_per_token for a, b in zip(candidates, candidates[1:]))
    assert plan_module.shaped(config, 2, 128).model == config.model  # the ladder holds the CPU preset exactly


@pytest.mark.slow
def test_a_longer_budget_buys_a_larger_model_and_measuring_stays_in_its_share(monkeypatch):
    config = load_config("llm_cpu.yaml", AUTO)
    choices = {}
    for seconds in (60, 600, 6000, 60000):
        clock, measured = FakeClock(seconds_per_measure=0.01 * seconds), []
        mocked_throughput(monkeypatch, clock, flop_rate=2e10, measured=measured)
        plan = plan_model(config, 65, unique_tokens=50_000_000, train_seconds=seconds, device=CPU, now=clock)
        choices[seconds] = plan.chosen.params
        # measuring stops at its share; past it, only the shape about to be chosen is measured (once)
        assert plan.plan_seconds <= plan_module.MEASURE_SHARE * seconds + 2 * clock.step
        assert [c.shape for c in plan.candidates if c.measured] == measured and plan.chosen.measured
        assert plan.chosen is min(plan.candidates, key=lambda c: c.loss)  # 50M tokens: the budget ends training
    assert choices[60] < choices[600] < choices[6000] < choices[60000]


def test_a_small_corpus_gets_a_smaller_model_than_a_large_one(monkeypatch):
    config = load_config("llm_cpu.yaml", AUTO)
    chosen = {}
    for unique in (200_000, 200_000_000):
        clock = FakeClock(seconds_per_measure=1.0)
        mocked_throughput(monkeypatch, clock, flop_rate=5e11, measured=[])
        plan = plan_model(config, 65, unique, train_seconds=3600, device=CPU, now=clock)
        chosen[unique] = plan.chosen
        assert plan.to_dict()["candidates"][0]["epochs"] == pytest.approx(
            plan.candidates[0].tokens / unique, rel=1e-2)
    assert chosen[200_000].params < chosen[200_000_000].params
    report = plan.report()
    assert report.startswith("[plan] model.size=auto: ") and f"-> {chosen[200_000_000].shape:>9}" in report


def test_a_size_in_parameters_picks_the_nearest_shape_and_auto_needs_a_budget():
    config = load_config("llm_cpu.yaml", {"model.size": "10M"})
    plan = plan_model(config, 65, 10**6, None, CPU)
    assert plan.chosen.shape == "6 x 384" and abs(math.log(plan.chosen.params / 1e7)) < 0.1
    with pytest.raises(KernelError, match="model.size=auto sizes the model for train.time_budget"):
        plan_model(load_config("llm_cpu.yaml", AUTO), 65, 10**6, None, CPU)


@pytest.mark.slow
def test_a_planned_run_trains_the_chosen_shape_and_its_resume_keeps_it(tmp_path, tiny, monkeypatch):
    from kernel.main import run
    from tests.conftest import StepClock

    monkeypatch.setattr(plan_module, "measure_tokens_per_s",
                        lambda config, candidate, *args: 1e10 / candidate.flops_per_token)
    settings = dict(model__size="auto", train__max_steps="auto", train__time_budget=4)
    first = run(tiny(**settings), tmp_path, now=StepClock(seconds_per_step=0.25).install(monkeypatch.setattr))
    plan = first["plan"]
    n_layer, n_embd = (int(x) for x in plan["chosen"].split(" x "))
    assert first["params"] == plan["params"] and first["stopped_by"] == "time_budget"
    saved = load_config(str(tmp_path / "config.yaml"))
    assert (saved.model.n_layer, saved.model.n_embd, saved.model.size) == (n_layer, n_embd, "auto")
    assert min(plan["candidates"], key=lambda c: c["law_score"])["shape"] == plan["chosen"]
    second = run(tiny(**{**settings, "train__time_budget": 6}), tmp_path,
                 now=StepClock(seconds_per_step=0.25).install(monkeypatch.setattr))
    assert second["resumed_from"] and second["plan"] is None and second["params"] == first["params"]


def test_a_shape_that_runs_out_of_memory_ends_the_ladder(monkeypatch):
    def measure(config, candidate, *args):
        if candidate.n_embd >= 256:
            raise plan_module.DoesNotFit("CUDA out of memory")  # as measure_tokens_per_s turns the device's error
        return 1e12 / candidate.flops_per_token

    monkeypatch.setattr(plan_module, "measure_tokens_per_s", measure)
    config = load_config("llm_cpu.yaml", AUTO)
    plan = plan_model(config, 65, 10**9, train_seconds=36000, device=CPU, now=FakeClock(0.0))
    assert [c.shape for c in plan.candidates] == ["1 x 64", "2 x 96", "2 x 128", "3 x 160", "3 x 192"]
    assert plan.chosen.shape == "3 x 192"  # the largest that fits wins with ten hours of a fast device


def test_each_candidate_is_timed_in_the_dtype_training_would_use(monkeypatch):
    """One dtype rule (env.resolve_dtype) for the planner and the trainer: on a CPU with native bf16, widths
    from CPU_BF16_MIN_WIDTH up train (and so are timed) in bf16, narrower ones in fp32."""
    import kernel.env as env_module

    monkeypatch.setattr(env_module, "cpu_has_native_bf16", lambda: True)
    timed = []
    monkeypatch.setattr(plan_module, "train_step", lambda model, *args: timed.append((model.config.n_embd, args[5])))
    config = load_config("llm_cpu.yaml", AUTO)
    for n_layer, n_embd in ((2, 128), (4, 256)):
        candidate = next(c for c in plan_module.ladder(config, 65) if (c.n_layer, c.n_embd) == (n_layer, n_embd))
        plan_module.measure_tokens_per_s(config, candidate, 65, CPU, now=FakeClock(0.0))
    assert {width: dtype for width, dtype in timed} == {128: torch.float32, 256: torch.bfloat16}
    resumed = env_module.resolve_dtype("auto", CPU, 512, resumed="float32")
    assert resumed == (torch.float32, "as when the checkpoint was written")  # a resume keeps its precision


# --- Kaggle's T4 x2 for 8 hours (issue 22): throughput from the T4's peak at a stated MFU -----------------------

def t4x2_plan(unique_tokens: int, mfu: float = 0.2):
    config = load_config("llm_kaggle_t4.yaml")
    estimate = plan_module.estimated_tokens_per_s(config, 256, NAMED_DEVICES["t4x2"], mfu)
    return plan_model(config, 256, unique_tokens, 8 * 3600, CPU, processes=2, now=FakeClock(0.0),
                      tokens_per_s=estimate)


def test_on_t4x2_for_8h_the_model_grows_with_the_corpus_and_a_corpus_is_repeated_at_most_16_times():
    plans = {size: t4x2_plan(size) for size in (10**7, 10**8, 10**9)}  # 10 MB, 100 MB, 1 GB of text (char)
    params = [plans[size].chosen.params for size in sorted(plans)]
    assert params[0] < params[1] < params[2]
    assert load_config("llm_kaggle_t4.yaml").model.size == "auto"  # the preset plans its model
    for size, plan in plans.items():
        assert plan.chosen.tokens / size <= plan_module.MAX_EPOCHS + 1e-9
        assert plan.rates == "estimated" and "(estimated)" in plan.report()
    small, large = plans[10**7], plans[10**9]
    step_tokens = 64 * 256
    assert small.steps == math.ceil(16 * 10**7 / step_tokens)  # the corpus ends it: max_steps is set
    assert small.chosen.tokens / small.chosen.tokens_per_s < 3600 and "stops after 16.0 passes" in small.why
    assert large.steps is None and large.chosen.tokens == pytest.approx(large.chosen.tokens_per_s * 8 * 3600)
    # the 32 x 2048 shape does not fit a T4's 15 GB with this batch (the memory plan says so, not a guess)
    with pytest.raises(plan_module.DoesNotFit):
        estimate = plan_module.estimated_tokens_per_s(load_config("llm_kaggle_t4.yaml"), 256, NAMED_DEVICES["t4"],
                                                      0.2)
        estimate(ladder(load_config("llm_kaggle_t4.yaml"), 256)[-1])


def test_a_corpus_too_small_for_the_first_steps_is_repeated_more_only_then():
    plan = t4x2_plan(10_000)
    min_steps = plan_module.minimum_steps(load_config("llm_kaggle_t4.yaml").train)
    assert plan.steps == min_steps == 400 and plan.chosen.tokens / 10_000 > plan_module.MAX_EPOCHS


def test_a_budget_too_small_is_refused_in_one_line_before_any_shape_is_measured(monkeypatch):
    measured = []
    monkeypatch.setattr(plan_module, "measure_tokens_per_s", lambda config, candidate, *a: measured.append(1) or 1e3)
    monkeypatch.setattr(plan_module, "peak_flops", lambda device, dtype: 1e9)  # a slow device
    config = load_config("llm_cpu.yaml", AUTO)
    with pytest.raises(KernelError, match=r"too little for even the smallest shape \(1 x 64\) to take 60 steps"):
        plan_model(config, 65, 10**6, train_seconds=5, device=CPU, now=FakeClock(0.0))
    assert measured == []


def test_when_measuring_leaves_no_time_no_shape_is_chosen_for_negative_time(monkeypatch):
    """The old planner then ranked every shape on max(1, 0 tokens) and chose the largest one."""
    clock = FakeClock(seconds_per_measure=100.0)  # each measurement takes longer than the whole budget
    mocked_throughput(monkeypatch, clock, flop_rate=2e10, measured=[])
    with pytest.raises(KernelError, match="measuring the shapes left -40s of train.time_budget, too little"):
        plan_model(load_config("llm_cpu.yaml", AUTO), 65, 10**6, train_seconds=60, device=CPU, now=clock)


def test_a_shape_is_timed_as_one_process_takes_its_share_of_the_batch(monkeypatch):
    steps = []
    monkeypatch.setattr(plan_module, "train_step", lambda model, optimizer, scaler, batches, *a: steps.append(
        [len(x) for x, _ in batches]))
    ticks = iter(range(100))
    config = load_config("llm_cpu.yaml", AUTO)  # batch 24, context 64
    smallest = ladder(config, 65)[0]
    rate = plan_module.measure_tokens_per_s(config, smallest, 65, CPU, processes=2, now=lambda: float(next(ticks)))
    assert steps == [[12]] * (1 + plan_module.MEASURED_STEPS)  # each process: 12 of the 24 sequences
    assert rate == 2 * plan_module.MEASURED_STEPS * 12 * 64 / 1.0  # both processes, one tick of the clock


def test_a_resumed_planned_run_keeps_the_steps_its_corpus_allowed():
    config = load_config("llm_kaggle_t4.yaml")
    saved = plan_module.planned(config, 10, 640, steps=97_657)
    resumed = plan_module.planned_before(config, saved)
    assert (resumed.model.n_embd, resumed.train.max_steps, resumed.train.lr) == (640, 97_657, saved.train.lr)
    assert plan_module.planned_before(load_config("llm_kaggle_t4.yaml", {"train.max_steps": 1000}),
                                      saved).train.max_steps == 1000  # a number the user gives wins


def test_the_plan_command_shows_the_t4x2_choice_for_a_corpus_size(capsys):
    from kernel.cli import cli

    assert cli(["plan", "--device", "t4x2", "--corpus", "100MB"]) == 0
    printed = capsys.readouterr().out
    assert "->  10 x 640" in printed and "(estimated)" in printed and "20% of the data-sheet peak" in printed
    assert "[memory] 10 layers x 640 wide" in printed
    assert cli(["plan", "--device", "t4x2"]) == 2
    assert "give its size, e.g. --corpus 100MB" in capsys.readouterr().err
