"""## 12. Report

What people look at after a run: `loss.png` (train and validation loss against tokens seen and against
wall-clock time, with the learning rate on a second axis) and a short summary in words.
"""

import io
import math
from pathlib import Path

from matplotlib.figure import Figure

from kernel.env import write_atomic


def plot_losses(history: list[dict], path: str | Path) -> Figure:
    """Draw the metrics into loss.png (written atomically); returns the figure."""
    train = [r for r in history if "train_loss" in r]
    val = [r for r in history if "val_loss" in r]
    figure = Figure(figsize=(12, 4.5), dpi=100, layout="constrained")
    by_tokens, by_time = figure.subplots(1, 2)
    for axis, x_key, label in ((by_tokens, "tokens", "tokens seen"), (by_time, "elapsed_s", "wall-clock (s)")):
        axis.plot([r[x_key] for r in train], [r["train_loss"] for r in train], label="train loss", color="tab:blue",
                  alpha=0.8)
        axis.plot([r[x_key] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss",
                  color="tab:orange")
        axis.set_xlabel(label)
        axis.set_ylabel("loss (nats / token)")
        axis.grid(alpha=0.3)
    learning_rate = by_tokens.twinx()
    learning_rate.plot([r["tokens"] for r in train], [r["lr"] for r in train], color="tab:green", alpha=0.5,
                       linestyle="--", label="learning rate")
    learning_rate.set_ylabel("learning rate")
    handles = by_tokens.get_legend_handles_labels()[0] + learning_rate.get_legend_handles_labels()[0]
    by_tokens.legend(handles=handles, loc="upper right")
    by_time.legend(loc="upper right")
    figure.suptitle("Training curves")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())
    return figure


def human_summary(summary: dict) -> str:
    """A few lines a person reads at the end of the notebook."""
    params = summary["params"]
    size = f"{params / 1e6:.2f}M" if params >= 1e6 else f"{params / 1e3:.0f}K"
    out = summary["out_dir"]
    return "\n".join([
        f"Model: {size} parameters, trained {summary['steps']:,} steps on {summary['tokens']:,} tokens "
        f"({summary['device']}, {summary['dtype']}), stopped by {summary['stopped_by']}.",
        f"Validation: loss {summary['val_loss']:.4f}, perplexity {summary['val_ppl']:.2f}, "
        f"{summary['val_bpb']:.3f} bits per byte" + ("" if math.isfinite(summary["val_loss"]) else " (diverged)") + ".",
        f"Speed: {summary['tokens_per_s']:,.0f} tokens/s over {summary['wall_s']:.0f} s of training"
        + (f", {100 * summary['mfu']:.1f}% model FLOPs utilisation." if summary.get("mfu") else "."),
        f"Files in {out}: loss.png, samples.txt, summary.json, metrics.jsonl, config.yaml, tokenizer/, checkpoints/.",
    ])
