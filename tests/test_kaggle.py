"""The notebook on a simulated Kaggle: /kaggle stands in as a temporary folder (KERNEL_KAGGLE_ROOT)."""

import functools
import json
import shutil
from pathlib import Path

import pytest

import build_kernel
from kernel.data import kaggle_text_files
import kernel.main as main_module
from kernel.main import main
from kernel.checkpoint import list_checkpoints
from tests.conftest import TINY, StepClock

ROOT = Path(__file__).resolve().parent.parent
FRENCH = "Il était une fois un modèle de langue qui apprenait à écrire sur Kaggle, lentement. "

NO_NETWORK = '''# Test harness: any connection outside the loopback interface fails, as on Kaggle with internet off.
import socket as _socket
_connect = _socket.socket.connect
def _loopback_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1")) and self.family != _socket.AF_UNIX:
        raise OSError(f"network blocked by the test: {address}")
    return _connect(self, address)
_socket.socket.connect = _loopback_only
'''


def kaggle(tmp_path: Path, monkeypatch, run_type: str = "Batch") -> Path:
    root = tmp_path / "kaggle"
    (root / "working").mkdir(parents=True)
    monkeypatch.setenv("KERNEL_KAGGLE_ROOT", str(root))
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", run_type)
    return root


def attach_dataset(root: Path, relative: str, count: int = 3) -> list[Path]:
    folder = root / "input" / relative
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"story{i}.txt"
        path.write_text(f"Histoire {i}. " + FRENCH * 60, encoding="utf-8")
        paths.append(path)
    return paths


def test_text_is_found_in_both_input_layouts_but_not_in_notebook_outputs(tmp_path, monkeypatch):
    root = kaggle(tmp_path, monkeypatch)
    new_layout = attach_dataset(root, "datasets/someone/stories")
    old_layout = attach_dataset(root, "old-stories", count=1)
    attach_dataset(root, "notebooks/me/my-gpt/outputs", count=1)  # an earlier version's samples: not data
    assert kaggle_text_files() == sorted(new_layout + old_layout)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["datasets/someone/stories", "stories"])
def test_the_notebook_runs_offline_in_a_simulated_kaggle(tmp_path, monkeypatch, layout):
    root = kaggle(tmp_path, monkeypatch)
    attach_dataset(root, layout)
    notebook = json.loads((ROOT / build_kernel.NOTEBOOK).read_text())
    notebook["cells"].insert(0, build_kernel.cell("code", "no-network", NO_NETWORK))
    overrides = {**TINY, "train.max_steps": 30}
    executed = build_kernel.execute_notebook(notebook, root / "working", {"OVERRIDES": overrides}, timeout=300)
    out = root / "working" / "outputs"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and "attached under" in summary["data"]["source"]
    assert summary["data"]["documents"] == 3
    assert (out / "samples.txt").exists() and list_checkpoints(out / "checkpoints")
    printed = "".join("".join(o.get("text", "")) for c in executed["cells"] for o in c.get("outputs", []))
    assert "[done] val loss" in printed and "\r" not in printed  # batch run: plain lines, no progress bar


@pytest.mark.parametrize("layout", ["notebooks/me/my-gpt", "my-gpt"])
def test_time_budget_then_resume_from_the_attached_earlier_version(tmp_path, monkeypatch, layout):
    root = kaggle(tmp_path, monkeypatch)
    attach_dataset(root, "datasets/someone/stories")
    clock = StepClock(seconds_per_step=0.25).install(monkeypatch.setattr)
    monkeypatch.setattr(main_module, "run", functools.partial(main_module.run, now=clock))
    overrides = {**TINY, "train.max_steps": 100_000, "train.time_budget": 4, "train.checkpoint_interval": 0}
    first = main("llm_cpu.yaml", overrides)
    out = root / "working" / "outputs"
    assert first["stopped_by"] == "time_budget" and first["steps"] == 12  # (4 - 1) s / 0.25 s
    saved_step = first["steps"]
    assert list_checkpoints(out / "checkpoints")[-1].name == f"ckpt_{saved_step:08d}.pt"
    # Version 2: the earlier output is attached as an input; /kaggle/working starts empty.
    shutil.move(str(out), str(root / "input" / layout / "outputs"))
    second = main("llm_cpu.yaml", {**overrides, "train.max_steps": saved_step + 20, "train.time_budget": 60})
    assert second["resumed_from"].startswith(str(root / "input" / layout))
    assert second["steps"] == saved_step + 20
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and metrics[-1]["step"] == saved_step + 20  # history carried over


def test_no_credential_reaches_any_written_file(tmp_path, monkeypatch):
    secret_user, secret_key = "user-7f3a9c", "key-0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("KAGGLE_USERNAME", secret_user)
    monkeypatch.setenv("KAGGLE_KEY", secret_key)
    root = kaggle(tmp_path, monkeypatch)
    main("llm_cpu.yaml", {**TINY, "train.max_steps": 10})
    written = [p for p in (root / "working").rglob("*") if p.is_file()]
    text = build_kernel.notebook_text(build_kernel.build_notebook())
    assert written and secret_user not in text and secret_key not in text
    for path in written:
        data = path.read_bytes()
        assert secret_user.encode() not in data and secret_key.encode() not in data, path


@pytest.mark.slow
def test_two_processes_on_a_simulated_kaggle_use_its_inputs_outputs_and_budget(tmp_path, monkeypatch, capsys):
    """Kaggle's T4 x2 path, with the 2 GPUs faked as 2 CPU processes: the launched processes see the same
    Kaggle (attached inputs, /kaggle/working/outputs, the default 8 h budget) as the notebook."""
    root = kaggle(tmp_path, monkeypatch)
    attach_dataset(root, "datasets/someone/stories")
    summary = main("llm_cpu.yaml", {**TINY, "train.max_steps": 10, "train.devices": 2})
    out = root / "working" / "outputs"
    assert summary["processes"] == 2 and summary["steps"] == 10 and summary["out_dir"] == str(out)
    assert "attached under" in summary["data"]["source"] and summary["data"]["documents"] == 3
    assert (out / "train_gpt_program.py").is_file() and list_checkpoints(out / "checkpoints")
    printed = capsys.readouterr().out
    assert printed.count("[env] Kaggle: train.time_budget defaults to 8h") == 1  # rank 0 only
    assert "\r" not in printed
