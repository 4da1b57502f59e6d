"""## 17. Around the loop: metrics, progress, the clock, stop requests

The training loop's helpers, each with one job: `MetricsLog` appends `metrics.jsonl`; `Progress` is the
progress bar (or, where a bar does not animate, such as a Save Version run or a log file, a line at the
first log step and then every half minute: time since the start, steps or the share of the time budget,
time left, loss, learning rate, tokens/s); `TrainingClock` measures the time spent training and the share
of the time budget used; `LossWindow` averages the training loss between log lines; `StopRequests` turns SIGTERM / SIGINT (the
notebook's interrupt, Kaggle's end of session) into a clean stop after the current step.
"""

import contextlib
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kernel.env import KernelError, is_batch_run, json_safe
from kernel.distributed import launcher_stop_request


# --- Metrics and progress ------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl: one JSON object per log or eval step, appended and flushed as the run goes."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")  # strict JSON: NaN as null


def show_progress_bar() -> bool:
    """A live bar where someone watches (a terminal, a notebook in the editor); plain lines in a Kaggle
    Save Version run or a log file, where a bar does not animate and only clutters the log."""
    return not is_batch_run() and (sys.stderr.isatty() or "ipykernel" in sys.modules)


def clock_text(seconds: float) -> str:
    """A duration as h:mm:ss (a person reads "1:02:03" faster than "3723 s")."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(elapsed: float, done: str, eta: float | None, loss: float, lr: float, tokens_per_s: float) -> str:
    """One plain progress line: time since the run started, how far it is, time left, and the figures."""
    left = clock_text(eta) if eta is not None else "?"
    return (f"[train] {clock_text(elapsed)} | {done} | ETA {left} | loss {loss:.4f} | lr {lr:.2e} | "
            f"{tokens_per_s:,.0f} tokens/s")


class Progress:
    """tqdm where it animates (total: the steps, or under max_steps auto the percent of the time budget);
    otherwise plain lines: the first at the first log step, then one per `every_s` seconds of `clock`."""

    def __init__(self, clock: "TrainingClock", total: float, initial: int, every_s: float = 30.0,
                 shown: bool = True, bar: bool | None = None):
        self.clock, self.total, self.initial, self.every_s, self.shown = clock, total, initial, every_s, shown
        self.last_line: float | None = None  # no line yet: the first log step prints one at once
        self.by_budget = not math.isfinite(total)  # max_steps auto: the budget is the measure of progress
        self.bar = self.make_bar() if shown and (show_progress_bar() if bar is None else bar) else None

    def make_bar(self):
        if self.by_budget:
            return tqdm(total=100, desc="train", unit="%", mininterval=1.0, dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}% of the time budget|{bar}| [{elapsed}<{remaining}{postfix}]")
        return tqdm(total=self.total, initial=self.initial, desc="train", unit="step", mininterval=1.0,
                    dynamic_ncols=True)

    def done(self, step: int) -> str:
        """How far training is: steps out of max_steps, or the share of the budget's training time."""
        if self.by_budget:
            return f"step {step:,} | {100 * self.clock.training_time_used()[0]:.1f}% of the time budget"
        return f"step {step:,}/{self.total:,} ({100 * step / self.total:.0f}%)"

    def eta(self, step: int) -> float | None:
        """Seconds until training ends: by the pace of this session's steps (evaluations included), or the
        time budget's end if that comes first; None while unknown."""
        candidates = [left] if (left := self.clock.training_left()) is not None else []
        if not self.by_budget and step > self.initial:
            per_step = (self.clock.now() - self.clock.loop_started) / (step - self.initial)
            candidates.append(per_step * (self.total - step))
        return min(candidates) if candidates else None

    def advance(self, step: int, loss: float | None = None, tokens_per_s: float | None = None,
                lr: float | None = None) -> None:
        if not self.shown:
            return
        if self.bar is not None:
            self.move_bar(step)
            if loss is not None:
                self.bar.set_postfix_str(f"step {step:,}, loss {loss:.4f}, lr {lr:.2e}, {tokens_per_s:,.0f} tokens/s")
            return
        now = self.clock.now()
        if loss is not None and (self.last_line is None or now - self.last_line >= self.every_s):
            self.last_line = now
            print(progress_line(now - self.clock.run_started, self.done(step), self.eta(step), loss, lr,
                                tokens_per_s), flush=True)

    def move_bar(self, step: int) -> None:
        position = 100 * min(1.0, self.clock.training_time_used()[0]) if self.by_budget else step
        if position > self.bar.n:
            self.bar.update(position - self.bar.n)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- The clock and the loss window ----------------------------------------------------------------------

RESERVE_FLOOR_S = 1.0  # the fixed part of what a budget keeps back to evaluate and save at the end


class TrainingClock:
    """Time spent in train(), read from `now` (injectable). With a deadline (a `now()` value), training stops
    when what is left is just enough to finish: 1.5 x (the longest evaluation + the longest checkpoint so
    far) + RESERVE_FLOOR_S; the share of the training time used lets the schedule's decay end with the budget."""

    def __init__(self, deadline: float | None, now=time.perf_counter, run_started: float | None = None):
        self.deadline, self.now = deadline, now
        self.started = self.loop_started = now()
        self.run_started = self.started if run_started is None else run_started  # where the budget began
        self.longest = {"eval": 0.0, "save": 0.0}

    def start_loop(self) -> None:
        self.loop_started = self.now()

    @contextlib.contextmanager
    def timing(self, kind: str):
        begun = self.now()
        yield
        self.longest[kind] = max(self.longest[kind], self.now() - begun)

    def training_ends(self) -> float | None:
        """When training must stop to leave time to evaluate and save (a `now()` value); None without a budget."""
        if self.deadline is None:
            return None
        return self.deadline - (1.5 * (self.longest["eval"] + self.longest["save"]) + RESERVE_FLOOR_S)

    def training_time_used(self) -> tuple[float, bool]:
        """(share of the time available for training used so far, whether it is all used)."""
        training_ends = self.training_ends()
        if training_ends is None:
            return 0.0, False
        now = self.now()
        return (now - self.loop_started) / max(1e-9, training_ends - self.loop_started), now >= training_ends

    def training_left(self) -> float | None:
        """Seconds of training the budget still allows; None without a budget."""
        training_ends = self.training_ends()
        return None if training_ends is None else max(0.0, training_ends - self.now())

    def elapsed(self) -> float:
        return self.now() - self.started

    def loop_time(self) -> float:
        """Seconds since the training loop started (its steps, evaluations and checkpoints)."""
        return self.now() - self.loop_started


class LossWindow:
    """The training loss summed on the device between two log lines: read back (a host sync) only when logged."""

    def __init__(self, device: torch.device, now):
        self.device, self.now = device, now
        self.reset()

    def reset(self) -> None:
        self.total, self.steps, self.tokens, self.started = torch.zeros((), device=self.device), 0, 0, self.now()

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.total += loss
        self.steps, self.tokens = self.steps + 1, self.tokens + tokens

    def mean(self) -> float:
        return (self.total / self.steps).item()

    def state(self) -> dict:
        """For checkpoints: a resumed run's first log line then averages the same steps as a straight run's."""
        return {"sum": self.total.item(), "steps": self.steps, "tokens": self.tokens}

    def restore(self, state: dict) -> None:
        self.total = torch.tensor(state["sum"], dtype=torch.float32, device=self.device)
        self.steps, self.tokens = state["steps"], state.get("tokens", 0)  # older checkpoints: not kept

    def tokens_per_s(self) -> float:
        return self.tokens / (self.now() - self.started)


# --- Stop signals --------------------------------------------------------------------------------------

class RunStopped(KernelError):
    """A stop signal outside the training loop (data preparation, sampling), where work cannot pause."""

    def __init__(self, signal_name: str, message: str = ""):
        super().__init__(message or f"stopped by {signal_name}")
        self.signal_name = signal_name


class StopRequests:
    """SIGTERM / SIGINT (a platform ending the session, Ctrl-C, a notebook's interrupt). Inside the training
    loop (`between_steps`) they ask it to stop after the current step, so it can checkpoint and write its
    outputs instead of dying mid-step. While the outputs are written (`while_writing`), a first stop (this
    signal, or the one that ended training) lets them finish in short form, and a second one interrupts the
    work in progress: the caller skips what is left. Anywhere else they raise RunStopped at once, which the
    run turns into a clean stop of that phase (half-written files are removed by the code that writes them)."""

    def __init__(self):
        self.signal_name: str | None = None  # the first signal received here
        self.count = 0                        # signals received here
        self.previous: dict = {}
        self.mode = "now"                     # "now": raise at once; "deferred": after the step; "writing"
        self.interrupted_by = 2               # while writing: the number of stops that interrupts the work
        self.finished = False                 # the run's last output is written: signals change nothing

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self.request)
        return self

    def request(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.signal_name, self.count = self.signal_name or name, self.count + 1
        if self.finished:
            return
        if self.mode == "now" or (self.mode == "writing" and self.stops() >= self.interrupted_by):
            raise RunStopped(name)
        if self.mode == "deferred" and self.stops() == 1:
            print(f"[train] {name} received: stopping after this step, then the checkpoint and the outputs in "
                  "short form (a second signal skips the outputs)", flush=True)
        elif self.mode == "deferred":
            print(f"[train] {name} received again: the checkpoint is still written, the outputs are skipped",
                  flush=True)
        else:
            print(f"[stop] {name} received: the outputs are finished in short form (a second signal skips them)",
                  flush=True)

    def finish(self) -> None:
        """The run's last output is written: a signal from now on changes nothing (the exit code stays 0), here
        and in the StopRequests this one is nested in (the command line's)."""
        self.finished = True
        for handler in self.previous.values():
            if isinstance(getattr(handler, "__self__", None), StopRequests):
                handler.__self__.finished = True

    @contextlib.contextmanager
    def phase(self, mode: str, interrupted_by: int = 2):
        before = self.mode, self.interrupted_by
        self.mode, self.interrupted_by = mode, interrupted_by
        try:
            yield self
        finally:
            self.mode, self.interrupted_by = before

    def between_steps(self):
        return self.phase("deferred")

    def while_writing(self, interrupted_by: int = 2):
        """Writing outputs: a signal raises RunStopped once `interrupted_by` stops have been asked for (2: only
        a second stop interrupts; 1: any stop, for work that a stop replaces by a shorter version)."""
        return self.phase("writing", interrupted_by)

    def stops(self) -> int:
        """Stops asked for: the signals received here, plus the one the multi-process launcher passed on."""
        return self.count + (1 if launcher_stop_request() else 0)

    def reason(self) -> str | None:
        """The signal received here, or the one the multi-process launcher passed on, or None."""
        return self.signal_name or launcher_stop_request()

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
