import json
import struct
from pathlib import Path

import pytest

from kernel.env import dtype_name, resolve_dtype
from kernel.optim import newton_schulz_dtype
from kernel.main import run
from kernel.report import LossCurves, human_summary, plot_losses

RECORDED = Path(__file__).parent / "data" / "metrics_llm_cpu.jsonl"  # metrics.jsonl of a default CPU run


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_loss_png_shows_the_metrics_and_the_summary_reads_well(tmp_path, tiny, monkeypatch):
    import kernel.report as report_module
    figures = []
    original = report_module.plot_losses
    monkeypatch.setattr(report_module, "plot_losses", lambda *args: figures.append(original(*args)) or figures[-1])
    monkeypatch.setattr(report_module, "in_notebook", lambda: False)  # ipykernel may be imported by other tests
    summary = run(tiny(train__max_steps=40), tmp_path)
    assert png_size(tmp_path / "loss.png") == (1200, 450)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    by_tokens = figures[0].axes[0]
    train_line, val_line = by_tokens.lines
    assert list(train_line.get_xdata()) == [m["tokens"] for m in metrics if "train_loss" in m]
    assert list(train_line.get_ydata()) == [m["train_loss"] for m in metrics if "train_loss" in m]
    assert list(val_line.get_ydata()) == [m["val_loss"] for m in metrics if "val_loss" in m]
    lr_axis = figures[0].axes[2]
    assert list(lr_axis.lines[0].get_ydata()) == [m["lr"] for m in metrics if "lr" in m]
    text = human_summary(summary)
    assert f"{summary['steps']:,} steps" in text and f"{summary['val_loss']:.4f}" in text and str(tmp_path) in text
    assert "hf/" in text and len(figures) == 1  # outside a notebook: drawn once, at the end


@pytest.mark.slow
def test_check_env_on_cpu_reports_versions_device_and_dtype():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "kernel", "check-env"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    import torch
    assert f"torch {torch.__version__}" in done.stdout and "transformers " in done.stdout
    assert "GPUs: none" in done.stdout
    assert "train.devices=auto trains with 1 process\n" in done.stdout
    ns_dtype, why = newton_schulz_dtype(torch.device("cpu"))  # the CPU preset's Muon, in this CPU's fast format
    assert f"train.optimizer=muon: Newton-Schulz in {dtype_name(ns_dtype)} ({why})\n" in done.stdout
    # the precision a run with that config would train in: on a CPU it depends on the model's width
    for width, line in ((128, done.stdout), (512, check_env("--set", "model.n_embd=512"))):
        dtype, why = resolve_dtype("auto", torch.device("cpu"), width)
        assert f"device cpu | dtype {dtype_name(dtype)} ({why})" in line
    assert "device cpu | dtype float32 (train.dtype=float32 was requested)" in check_env("--set", "train.dtype=float32")


def check_env(*args: str) -> str:
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "kernel", "check-env", *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_old_packages_are_warned_about():
    from kernel.env import version_warnings
    warnings = version_warnings({"python": "3.12.1", "torch": "2.9.0+cu121", "transformers": "5.1.0",
                                 "tokenizers": "0.22.1", "numpy": "2.4.0", "pyyaml": "6.0.2", "tqdm": "4.67.1"})
    assert warnings == ["torch 2.9.0+cu121 is older than 2.10, the oldest version this was tested with"]
    assert "tqdm is not installed" in version_warnings({**dict.fromkeys(["python", "torch"], "9.9")})[-1]


def recorded_history() -> list[dict]:
    return [json.loads(line) for line in RECORDED.read_text().splitlines()]


def test_loss_png_from_a_recorded_history_is_readable_at_a_glance(tmp_path):
    history = recorded_history()
    figure = plot_losses(history, tmp_path / "loss.png", "outputs: llama 2 x 128, char tokens")
    assert png_size(tmp_path / "loss.png") == (1200, 450)
    by_tokens, by_time, learning_rate = figure.axes
    evaluations = [r for r in history if "val_loss" in r]
    past_start = [r for r in history if r["tokens"] >= 0.05 * history[-1]["tokens"]]
    later = [r[k] for r in past_start for k in ("train_loss", "val_loss") if k in r]
    bottom, top = by_tokens.get_ylim()
    assert bottom < min(later) and max(later) < top < evaluations[0]["val_loss"]  # step 0's loss is off the top
    assert by_time.get_ylim() == (bottom, top)
    title = figure.get_suptitle()
    last = evaluations[-1]
    assert title.startswith("outputs: llama 2 x 128, char tokens | step 2,000")
    assert f"val loss {last['val_loss']:.3f}" in title
    assert f"{last['val_bpb']:.3f} bits/byte" in title and f"ppl {last['val_ppl']:.2f}" in title
    assert len(figure.legends) == 1 and all(axis.get_legend() is None for axis in figure.axes)  # outside the data
    labels = [t.get_text() for t in figure.legends[0].get_texts()]
    assert labels == ["train loss", "validation loss", "learning rate"]
    step_axis, = by_tokens.child_axes  # optimizer steps on the top axis
    assert step_axis.get_xlabel() == "optimizer step"
    assert step_axis.xaxis.get_major_formatter()(1000, 0) == "1k"
    assert by_tokens.xaxis.get_major_formatter()(1_500_000, 0) == "1.5M"
    assert by_tokens.xaxis.get_offset_text().get_text() == ""  # no bare 1e6 offset


@pytest.fixture
def ipython_shell(tmp_path, monkeypatch):
    """A real IPython shell whose display messages (what a notebook front end receives) are recorded."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config as ShellConfig
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    settings = ShellConfig()
    settings.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=settings)
    messages = []
    monkeypatch.setattr(shell.display_pub, "publish",
                        lambda data, metadata=None, *args, **kwargs: messages.append((data, kwargs)))
    yield messages
    InteractiveShell.clear_instance()


@pytest.mark.slow
def test_in_a_notebook_one_figure_is_updated_in_place_as_evaluations_arrive(tmp_path, ipython_shell):
    history = recorded_history()
    curves = LossCurves(tmp_path / "loss.png", "outputs", live=True)
    pictures = []
    for i, record in enumerate(history):
        if "val_loss" in record:  # what train() does: on_eval(history so far) after each evaluation
            curves.update(history[: i + 1])
            pictures.append((tmp_path / "loss.png").read_bytes())
    curves.finish(history)
    evaluations = sum("val_loss" in r for r in history)
    assert len(pictures) == evaluations == 9 and len(set(pictures)) == evaluations  # the file changes each time
    assert len(ipython_shell) == evaluations + 1
    display_ids = {kwargs["transient"]["display_id"] for _, kwargs in ipython_shell}
    assert len(display_ids) == 1  # one display, created once...
    updates = [kwargs.get("update", False) for _, kwargs in ipython_shell]
    assert updates == [False] + [True] * evaluations  # ...then updated
    assert ipython_shell[-1][0]["image/png"] and png_size(tmp_path / "loss.png") == (1200, 450)


def test_outside_a_notebook_the_png_is_written_at_the_end_only(tmp_path):
    history = recorded_history()
    curves = LossCurves(tmp_path / "loss.png", "outputs", live=False)
    curves.update(history[:30])
    assert not (tmp_path / "loss.png").exists()
    curves.finish(history)
    assert png_size(tmp_path / "loss.png") == (1200, 450)


def test_a_redraw_that_fails_never_stops_the_training(tmp_path, capsys):
    (tmp_path / "not-a-folder").write_text("x")
    curves = LossCurves(tmp_path / "not-a-folder" / "loss.png", "outputs", live=True)
    history = recorded_history()
    curves.update(history[:30])
    curves.update(history)  # said once, then no more redrawing until the end
    assert capsys.readouterr().out.count("[warn] could not redraw loss.png") == 1


def test_check_env_says_which_format_muons_iteration_takes(monkeypatch, capsys):
    import kernel.optim as optim_module
    from kernel.cli import check_env_command, check_env_parser
    monkeypatch.setattr(optim_module, "cpu_has_native_bf16", lambda: False)
    check_env_command(check_env_parser().parse_args(["--config", "llm_cpu.yaml"]))
    assert "[env] train.optimizer=muon: Newton-Schulz in float32 (cpu without native bf16" in capsys.readouterr().out


def test_an_evaluate_only_run_reports_itself_as_such():
    summary = {"out_dir": "/nowhere", "steps": 0, "tokens": 0, "stopped_by": "max_steps", "params": 1_234_567,
               "device": "cpu", "dtype": "float32", "val_loss": 2.5, "val_ppl": 12.18, "val_bpb": 3.6,
               "tokens_per_s": 0.0, "wall_s": 17.0, "mfu": None}
    text = human_summary(summary)
    assert text.splitlines()[0] == "Model: 1.23M parameters, evaluated as it is (train.max_steps=0), not trained."
    assert "tokens/s" not in text and "of training" not in text
    trained = human_summary({**summary, "steps": 30, "tokens": 960, "tokens_per_s": 480.0, "wall_s": 2.0})
    assert "trained 30 steps on 960 tokens (cpu, float32), stopped by max_steps" in trained
    assert "Speed: 480 tokens/s over 2 s of training." in trained
