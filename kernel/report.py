"""## 23. Report

What people look at after a run: `loss.png` and a short summary in words. The figure shows train and
validation loss against tokens seen (optimizer steps on the top axis, the learning rate on a second axis)
and against wall-clock time. The loss axis starts below the lowest loss and ends above the losses after the
first 5% of training, so the first steps' high loss (off the top) does not squeeze the curve that matters;
the title holds the run's name and its latest validation figures. In a notebook it is one figure, redrawn
in place after every evaluation (an IPython display handle), so the curve grows while the run trains;
elsewhere `loss.png` is written at the end. With several GPUs (whose training processes run outside the
notebook) the notebook shows it once, at the end.
"""

import io
import math
import sys
import typing
from pathlib import Path

if typing.TYPE_CHECKING:  # matplotlib is imported when a figure is drawn: at start it cost 1.4 s of every budget
    from matplotlib.figure import Figure

from kernel.env import (ADAPTER_DIR, CHECKPOINTS_DIR, CONFIG_FILE, CURVES_FILE, EXPORT_DIR, METRICS_FILE, SAMPLES_FILE,
                        SUMMARY_FILE, TOKENIZER_DIR, count_words, write_atomic)
from kernel.config import Config


def in_notebook() -> bool:
    return "ipykernel" in sys.modules


def run_label(out_dir: Path, config: Config) -> str:
    """The run as the figure's title names it: its output folder, model and tokenizer."""
    m = config.model
    return f"{Path(out_dir).name}: {m.arch} {m.n_layer} x {m.n_embd}, {config.tokenizer.mode} tokens"


def loss_range(losses: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(bottom, top) of the loss axis for (x, loss) points: below the lowest loss; above every loss after the
    first 5% of the x range, so the first steps' high loss does not squeeze the rest of the curve."""
    finite = [(x, y) for x, y in losses if math.isfinite(y) and y > 0]
    if not finite:
        return None
    start, end = min(x for x, _ in finite), max(x for x, _ in finite)
    later = [y for x, y in finite if x >= start + 0.05 * (end - start)]
    bottom, top = min(y for _, y in finite), max(later or [y for _, y in finite])
    return bottom / 1.05, max(top * 1.05, bottom * 1.2)


def title_figures(history: list[dict]) -> str:
    evaluations = [r for r in history if "val_loss" in r]
    if not evaluations:
        return "no evaluation yet"
    last = evaluations[-1]
    return (f"step {last['step']:,}, {count_words(last.get('tokens', 0))} tokens: val loss {last['val_loss']:.3f}, "
            f"ppl {last['val_ppl']:.2f}, {last['val_bpb']:.3f} bits/byte")


def training_time(record: dict) -> float:
    """A record's x on the time panel: the training time over every session (records written before that was
    kept have only their own session's clock)."""
    return record.get("train_seconds_total", record.get("elapsed_s", 0.0))


def plot_losses(history: list[dict], path: str | Path, label: str = "", sessions: list[dict] = ()) -> "Figure":
    """Draw the metrics into loss.png (written atomically); returns the figure. `sessions` (one per run that
    trained, see checkpoint.py): a dotted line where each later one began."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    train = [r for r in history if "train_loss" in r]
    val = [r for r in history if "val_loss" in r]
    figure = Figure(figsize=(12, 4.5), dpi=100, layout="constrained")
    by_tokens, by_time = figure.subplots(1, 2)
    limits = loss_range([(r["tokens"], r["train_loss"]) for r in train] + [(r["tokens"], r["val_loss"]) for r in val])
    for axis, x_of, x_label in ((by_tokens, lambda r: r["tokens"], "tokens seen"),
                                (by_time, training_time, "training time (s), over every session")):
        axis.plot([x_of(r) for r in train], [r["train_loss"] for r in train], label="train loss", color="tab:blue",
                  alpha=0.8)
        axis.plot([x_of(r) for r in val], [r["val_loss"] for r in val], "o-", label="validation loss",
                  color="tab:orange")
        format_loss_axis(axis, limits)
        axis.set_xlabel(x_label)
        axis.xaxis.set_major_formatter(EngFormatter(sep=""))  # 1.5M, not a bare 1e6 offset
    starts = mark_sessions(by_tokens, by_time, sessions, max((r["step"] for r in history), default=0))
    add_step_axis(by_tokens, history)
    learning_rate = by_tokens.twinx()
    learning_rate.plot([r["tokens"] for r in train], [r["lr"] for r in train], color="tab:green", alpha=0.5,
                       linestyle="--", label="learning rate")
    learning_rate.set_ylabel("learning rate")
    learning_rate.set_ylim(bottom=0)
    handles = by_tokens.get_legend_handles_labels()[0] + learning_rate.get_legend_handles_labels()[0]
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    in_sessions = f" | {starts + 1} sessions" if starts else ""
    figure.suptitle(f"{label + ' | ' if label else ''}{title_figures(history)}{in_sessions}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())
    return figure


def format_loss_axis(axis, limits: tuple[float, float] | None) -> None:
    if limits:
        axis.set_ylim(*limits)
    axis.set_ylabel("loss (nats / token)")
    axis.grid(alpha=0.3)


def mark_sessions(by_tokens, by_time, sessions: list[dict], last_step: int) -> int:
    """A dotted vertical line where each later session began (a resumed run, a new notebook version): at the
    end of every session that ended before the curve's last step. Returns how many."""
    tokens = seconds = 0.0
    starts = 0
    for session in sessions:
        tokens, seconds = tokens + session["tokens"], seconds + (session.get("train_seconds") or 0.0)
        if session["ended_step"] < last_step:
            by_tokens.axvline(tokens, color="grey", linestyle=":", linewidth=1)
            by_time.axvline(seconds, color="grey", linestyle=":", linewidth=1)
            starts += 1
    return starts


def add_step_axis(by_tokens, history: list[dict]) -> None:
    """Optimizer steps on the top axis (every step trains on the same number of tokens)."""
    from matplotlib.ticker import EngFormatter

    counted = [r for r in history if r.get("step") and r.get("tokens")]
    if not counted:
        return
    per_step = counted[-1]["tokens"] / counted[-1]["step"]
    steps = by_tokens.secondary_xaxis("top", functions=(lambda t: t / per_step, lambda s: s * per_step))
    steps.set_xlabel("optimizer step")
    steps.xaxis.set_major_formatter(EngFormatter(sep=""))


class LossCurves:
    """loss.png for a run. In a notebook (`live`) one displayed image, updated in place through its IPython
    display handle after every evaluation and at the end; elsewhere the file is written at the end only."""

    def __init__(self, path: str | Path, label: str, live: bool | None = None, sessions: list[dict] = ()):
        self.path, self.label, self.sessions = Path(path), label, list(sessions)  # the earlier sessions
        self.live = in_notebook() if live is None else live
        self.handle = None  # the IPython DisplayHandle, once displayed
        self.redraw = self.live  # redrawn after each evaluation (until a redraw fails)

    def update(self, history: list[dict]) -> None:
        """After an evaluation (train()'s on_eval): redraw, in a notebook. A figure that cannot be drawn (a full
        disk, a display error) must not stop the training: it says so once and waits for the end."""
        if not self.redraw:
            return
        try:
            self.draw(history)
        except Exception as err:  # noqa: BLE001 - a convenience, never worth the run
            print(f"[warn] could not redraw loss.png ({type(err).__name__}: {err}); it is drawn again at the end")
            self.redraw = False

    def finish(self, history: list[dict], sessions: list[dict] | None = None) -> "Figure":
        """The final figure, with every session: written, and shown (updated in place) in a notebook."""
        self.sessions = self.sessions if sessions is None else sessions
        return self.draw(history)

    def draw(self, history: list[dict]) -> "Figure":
        figure = plot_losses(history, self.path, self.label, self.sessions)
        if self.live:
            from IPython.display import Image, display

            image = Image(data=self.path.read_bytes(), format="png")
            if self.handle is None:
                self.handle = display(image, display_id=True)
            else:
                self.handle.update(image)
        return figure


def human_summary(summary: dict) -> str:
    """A few lines a person reads at the end of the notebook."""
    out, sessions = summary["out_dir"], len(summary.get("sessions") or [])
    over = f" over {sessions} sessions" if sessions > 1 else ""
    evaluated_only = summary["steps"] == 0 and summary["stopped_by"] == "max_steps"
    trained = ("evaluated as it is (train.max_steps=0), not trained" if evaluated_only else
               f"trained {summary['steps']:,} steps on {summary['tokens']:,} tokens{over} ({summary['device']}, "
               f"{summary['dtype']}), {'this session ' if sessions > 1 else ''}stopped by {summary['stopped_by']}")
    seconds = summary.get("train_seconds", summary["wall_s"])
    speed = ("" if evaluated_only else f"Speed: {summary['tokens_per_s']:,.0f} tokens/s over {seconds:.0f} s "
             "of training" + (f", {100 * summary['mfu']:.1f}% model FLOPs utilisation." if summary.get("mfu") else "."))
    return "\n".join(line for line in [
        f"Model: {count_words(summary['params'])} parameters, {trained}.",
        f"Validation: loss {summary['val_loss']:.4f}, perplexity {summary['val_ppl']:.2f}, "
        f"{summary['val_bpb']:.3f} bits per byte" + ("" if math.isfinite(summary["val_loss"]) else " (diverged)") + ".",
        speed, f"Files in {out}: {', '.join(output_files(Path(out)))}.",
    ] if line)


# What a run writes, as the summary names it (a step skipped after a stop or a warning leaves its file out).
OUTPUT_FILES = ((CURVES_FILE, CURVES_FILE), (SAMPLES_FILE, SAMPLES_FILE), (SUMMARY_FILE, SUMMARY_FILE),
                (METRICS_FILE, METRICS_FILE), (CONFIG_FILE, CONFIG_FILE),
                (EXPORT_DIR, f"{EXPORT_DIR}/ (the model for transformers, with its model card README.md)"),
                (ADAPTER_DIR, f"{ADAPTER_DIR}/ (the LoRA adapters in PEFT's format)"),
                (TOKENIZER_DIR, f"{TOKENIZER_DIR}/"), (CHECKPOINTS_DIR, f"{CHECKPOINTS_DIR}/"))


def output_files(out: Path) -> list[str]:
    return [label for name, label in OUTPUT_FILES if (out / name).exists()]
