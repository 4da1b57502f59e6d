"""The real `kaggle` CLI and `build_kernel.py --push` against a fake Kaggle server on 127.0.0.1."""

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_kaggle import FakeKaggle

ROOT = Path(__file__).resolve().parent.parent
USER, KEY = "push-tester", "0123456789abcdef0123456789abcdef"
pytest.importorskip("kaggle", reason="the kaggle CLI is in requirements-dev.txt")


def cli_env(tmp_path: Path, proxy: str, credentials: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if k.upper() not in ("NO_PROXY", "KAGGLE_USERNAME", "KAGGLE_KEY",
                                                                       "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR")}
    (tmp_path / "home" / ".kaggle").mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(tmp_path / "home"), KAGGLE_CONFIG_DIR=str(tmp_path / "home" / ".kaggle"),
               KAGGLE_API_ENVIRONMENT="LOCALHOST", HTTP_PROXY=proxy, http_proxy=proxy)
    if credentials:
        env.update(KAGGLE_USERNAME=USER, KAGGLE_KEY=KEY)
    return env


def build(tmp_path: Path, env: dict, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "build_kernel.py", "--id", "push-tester/train-a-gpt", "--dataset",
                           "someone/stories", "--continue", "--push-dir", str(tmp_path / "push"), *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def check_pushed(request: dict) -> None:
    body = request["json"]
    assert body["slug"] == "push-tester/train-a-gpt" and body["newTitle"] == "Train a gpt"
    assert body["language"] == "python" and body["kernelType"] == "notebook"
    assert body["enableGpu"] is True and body["enableInternet"] is False and body["machineShape"] == "NvidiaTeslaT4"
    assert body["datasetDataSources"] == ["someone/stories"]
    assert body["kernelDataSources"] == ["push-tester/train-a-gpt"]
    assert body["isPrivate"] is True
    pushed = json.loads(body["text"])
    built = json.loads((ROOT / "notebook" / "train_gpt.ipynb").read_text())
    assert [c["source"] for c in pushed["cells"]] == ["".join(c["source"]) for c in built["cells"]]
    assert request["authorization"] == "Basic " + base64.b64encode(f"{USER}:{KEY}".encode()).decode()


def test_the_real_cli_accepts_the_laid_out_folder(tmp_path):
    with FakeKaggle() as server:
        env = cli_env(tmp_path, server.proxy)
        assert build(tmp_path, env).returncode == 0  # lay out only
        kaggle_cli = Path(sys.executable).parent / "kaggle"
        done = subprocess.run([str(kaggle_cli), "kernels", "push", "-p", str(tmp_path / "push")], env=env,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Kernel version 7 successfully pushed" in done.stdout
    assert len(server.pushes()) == 1
    check_pushed(server.pushes()[0])


def test_build_kernel_push_reports_the_version_url(tmp_path):
    with FakeKaggle() as server:
        done = build(tmp_path, cli_env(tmp_path, server.proxy), "--push")
    assert done.returncode == 0, done.stderr
    assert "pushed version 7: https://www.kaggle.com/code/push-tester/train-a-gpt" in done.stdout
    check_pushed(server.pushes()[0])
    assert KEY not in done.stdout + done.stderr  # never printed
    assert not [p for p in (tmp_path / "push").rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]


def test_a_server_error_makes_push_fail_with_its_message(tmp_path):
    with FakeKaggle(error="Notebook slug is already used by another user") as server:
        done = build(tmp_path, cli_env(tmp_path, server.proxy), "--push")
    assert done.returncode == 1
    assert "push failed: the server answered: Notebook slug is already used by another user" in done.stderr


def test_missing_credentials_give_a_clear_message_and_send_nothing(tmp_path):
    with FakeKaggle() as server:
        done = build(tmp_path, cli_env(tmp_path, server.proxy, credentials=False), "--push")
    assert done.returncode == 1
    assert "no Kaggle credentials" in done.stderr and "kaggle.json" in done.stderr
    assert server.requests == []


def test_the_placeholder_id_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "build_kernel.py", "--push", "--push-dir", str(tmp_path / "p")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "--id YOUR_KAGGLE_NAME/a-slug" in done.stderr
