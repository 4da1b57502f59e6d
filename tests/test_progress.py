"""The log a person follows: progress lines and the bar, under an injected clock (never real time)."""

import math

import kernel.progress as progress_module
from kernel.main import run
from kernel.progress import Progress, TrainingClock, clock_text
from tests.conftest import StepClock


class ManualClock:
    """A clock that moves only when the test says so."""

    def __init__(self):
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def started_clock(deadline: float | None, setup_s: float = 20.0) -> tuple[ManualClock, TrainingClock]:
    """The run started `setup_s` before the loop (data, model); the loop starts at 0."""
    now = ManualClock()
    clock = TrainingClock(deadline, now, run_started=-setup_s)
    clock.start_loop()
    return now, clock


def test_clock_text_reads_as_hours_minutes_seconds():
    assert [clock_text(s) for s in (0, 59.6, 61, 3723, 8 * 3600)] == ["0:00:00", "0:01:00", "0:01:01", "1:02:03",
                                                                      "8:00:00"]


def test_a_plain_line_holds_elapsed_steps_eta_loss_lr_and_tokens_per_second(capsys):
    now, clock = started_clock(deadline=None)
    progress = Progress(clock, total=300, initial=100, bar=False)  # resumed at step 100 of 300
    now.seconds = 5.0
    progress.advance(110, loss=2.5, tokens_per_s=1234.5, lr=3e-4)
    # 10 steps in 5 s: 190 steps left take 95 s; elapsed counts from the run's start (20 s of setup)
    assert capsys.readouterr().out.strip() == ("[train] 0:00:25 | step 110/300 (37%) | ETA 0:01:35 | loss 2.5000 | "
                                               "lr 3.00e-04 | 1,234 tokens/s")


def test_under_max_steps_auto_the_line_shows_the_share_of_the_budget_and_its_end(capsys):
    now, clock = started_clock(deadline=1001.0)  # 1 s is kept to finish: 1000 s of training
    progress = Progress(clock, total=math.inf, initial=0, bar=False)
    now.seconds = 250.0
    progress.advance(500, loss=2.0, tokens_per_s=100.0, lr=1e-3)
    line = capsys.readouterr().out.strip()
    assert line == ("[train] 0:04:30 | step 500 | 25.0% of the time budget | ETA 0:12:30 | loss 2.0000 | "
                    "lr 1.00e-03 | 100 tokens/s")


def test_the_first_line_comes_at_the_first_log_step_then_one_per_interval(capsys):
    now, clock = started_clock(deadline=None)
    progress = Progress(clock, total=1000, initial=0, bar=False)
    printed = []
    for step, seconds in ((1, 0.5), (10, 2.0), (20, 4.0), (150, 31.0), (160, 33.0), (300, 63.0)):
        now.seconds = seconds
        progress.advance(step)  # a step between log steps: never a line
        if step % 10 == 0:  # a log step
            progress.advance(step, loss=1.0, tokens_per_s=1.0, lr=1e-3)
        printed += [line.split(" | ")[1] for line in capsys.readouterr().out.splitlines()]
    # at once at the first log step (2 s), then at the first log step 30 s of the clock later: 33 s, 63 s
    assert printed == ["step 10/1,000 (1%)", "step 160/1,000 (16%)", "step 300/1,000 (30%)"]


def test_the_bar_has_a_total_under_max_steps_auto_and_shows_the_same_figures(capsys):
    now, clock = started_clock(deadline=1001.0)
    progress = Progress(clock, total=math.inf, initial=0, bar=True)
    assert progress.bar.total == 100  # percent of the budget's training time
    now.seconds = 400.0
    progress.advance(800, loss=1.5, tokens_per_s=2000.0, lr=5e-4)
    assert round(progress.bar.n, 6) == 40.0
    assert progress.bar.postfix == "step 800, loss 1.5000, lr 5.00e-04, 2,000 tokens/s"
    progress.close()
    steps = Progress(clock, total=300, initial=100, bar=True)
    assert (steps.bar.total, steps.bar.n) == (300, 100)
    steps.close()
    assert "of the time budget" in capsys.readouterr().err


def test_a_run_logs_its_first_line_at_the_first_log_step(tmp_path, tiny, monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "show_progress_bar", lambda: False)  # a batch log
    clock = StepClock(seconds_per_step=1.0).install(monkeypatch.setattr)
    run(tiny(train__max_steps=40, train__log_interval=5), tmp_path, now=clock)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[train] ") and "ETA" in line]
    # the first at step 5 (1 s a step: 35 s left), the next once 30 s of the clock have passed
    assert [line.split(" | ")[1:3] for line in lines] == [["step 5/40 (12%)", "ETA 0:00:35"],
                                                          ["step 35/40 (88%)", "ETA 0:00:05"]]
    assert all("lr " in line and "tokens/s" in line and "loss " in line for line in lines)
