import json
import struct

from kernel.main import run
from kernel.report import human_summary


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_loss_png_shows_the_metrics_and_the_summary_reads_well(tmp_path, tiny, monkeypatch):
    import kernel.main as main_module
    figures = []
    original = main_module.plot_losses
    monkeypatch.setattr(main_module, "plot_losses", lambda history, path: figures.append(original(history, path)))
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


def test_check_env_on_cpu_reports_versions_device_and_dtype():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "kernel", "check-env"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    import torch
    assert f"torch {torch.__version__}" in done.stdout and "transformers " in done.stdout
    assert "GPUs: none" in done.stdout and "device cpu | dtype float32" in done.stdout
    assert "train.devices=auto trains with 1 process\n" in done.stdout


def test_old_packages_are_warned_about():
    from kernel.env import version_warnings
    warnings = version_warnings({"python": "3.12.1", "torch": "2.9.0+cu121", "transformers": "5.1.0",
                                 "tokenizers": "0.22.1", "numpy": "2.4.0", "pyyaml": "6.0.2", "tqdm": "4.67.1"})
    assert warnings == ["torch 2.9.0+cu121 is older than 2.10, the oldest version this was tested with"]
    assert "tqdm is not installed" in version_warnings({**dict.fromkeys(["python", "torch"], "9.9")})[-1]
