"""The notebook on a simulated Kaggle: /kaggle stands in as a temporary folder (KERNEL_KAGGLE_ROOT)."""

import functools
import json
import shutil
import tempfile
from pathlib import Path

import pytest

import build_kernel
from kernel.inputs import list_sources
from kernel.env import KernelError
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
    (root / "tmp").mkdir()  # the session's scratch space (the token cache goes there), not kept as output
    monkeypatch.setenv("TMPDIR", str(root / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(root / "tmp"))
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
    description, sources, skipped = list_sources("")
    assert [s.path for s in sources] == sorted(new_layout + old_layout)
    assert description == "4 file(s) (4 text): someone/stories, Kaggle dataset old-stories"  # safe to publish


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
    assert summary["steps"] == 30 and str(tmp_path) not in summary["data"]["source"]
    assert summary["data"]["source"].endswith("someone/stories" if "/" in layout else "Kaggle dataset stories")
    assert summary["data"]["documents"] == 3
    assert (out / "samples.txt").exists() and list_checkpoints(out / "checkpoints")
    assert not (out / "cache").exists() and summary["data"]["cache"].startswith(str(root / "tmp"))  # not kept
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
    assert summary["data"]["source"] == "3 file(s) (3 text): someone/stories" and summary["data"]["documents"] == 3
    assert (out / "train_gpt_program.py").is_file() and list_checkpoints(out / "checkpoints")
    printed = capsys.readouterr().out
    assert printed.count("[env] Kaggle: train.time_budget defaults to 8h") == 1  # rank 0 only
    assert "\r" not in printed


def attach_csv_dataset(root: Path, relative: str) -> Path:
    folder = root / "input" / relative
    folder.mkdir(parents=True, exist_ok=True)
    rows = "".join(f'{i},"Critique {i}, en deux lignes:\n{FRENCH * 8}",{i % 5}\n' for i in range(20))
    (folder / "reviews.csv").write_text("id,text,stars\n" + rows, encoding="utf-8")
    return folder / "reviews.csv"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["notebooks/me/my-gpt", "my-gpt"])
@pytest.mark.parametrize("data_glob", ["", "{root}/input/**/*.*"])
def test_an_attached_earlier_version_is_never_training_text(tmp_path, monkeypatch, layout, data_glob):
    root = kaggle(tmp_path, monkeypatch)
    attach_dataset(root, "datasets/someone/stories")
    attach_csv_dataset(root, "datasets/someone/reviews")
    glob_pattern = data_glob.format(root=root)
    first = main("llm_cpu.yaml", {**TINY, "train.max_steps": 4}, data_glob=glob_pattern)
    assert first["data"]["formats"] == {"csv": {"files": 1, "documents": 20}, "text": {"files": 3, "documents": 3}}
    out = root / "working" / "outputs"
    earlier = root / "input" / layout
    shutil.move(str(out), str(earlier / "outputs"))  # Add Input > Your Work > this notebook
    (earlier / "__notebook__.ipynb").write_text("{}", encoding="utf-8")  # what Kaggle keeps beside the outputs
    second = main("llm_cpu.yaml", {**TINY, "train.max_steps": 8}, data_glob=glob_pattern)
    assert second["resumed_from"].startswith(str(earlier)) and second["steps"] == 8
    for key in ("chars", "documents", "formats", "train_tokens", "val_tokens"):
        assert second["data"][key] == first["data"][key], key
    skipped = {entry["path"]: entry["reason"] for entry in second["data"]["skipped_files"]}
    looked_at_earlier = glob_pattern or layout == "my-gpt"  # the new layout's notebooks/ is not searched at all
    for name in ("outputs/samples.txt", "outputs/metrics.jsonl", "outputs/summary.json", "__notebook__.ipynb"):
        assert (str(earlier / name) in skipped) == bool(looked_at_earlier), name
    assert all("output folder" in why for path, why in skipped.items() if path.startswith(str(earlier))), [w for w in skipped.values() if "output folder" not in w]


def test_a_dataset_holding_only_a_csv_trains_on_its_text_column(tmp_path, monkeypatch, capsys):
    root = kaggle(tmp_path, monkeypatch)
    attach_csv_dataset(root, "reviews")
    summary = main("llm_cpu.yaml", {**TINY, "train.max_steps": 2})
    assert "reviews" in summary["data"]["source"] and summary["data"]["formats"]["csv"]["documents"] == 20
    assert "demo corpus" not in capsys.readouterr().out


def test_a_dataset_with_nothing_readable_stops_with_what_it_holds(tmp_path, monkeypatch):
    root = kaggle(tmp_path, monkeypatch)
    folder = root / "input" / "datasets" / "someone" / "images"
    folder.mkdir(parents=True)
    (folder / "cat.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    (folder / "labels.xlsx").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(KernelError, match=r"no usable text under .*input: unsupported extension \(read: text .*\): .*cat.jpg, "
                                          r".*labels.xlsx$"):
        main("llm_cpu.yaml", {**TINY, "train.max_steps": 2})
    assert not (root / "working" / "outputs" / "checkpoints").exists()
