#!/usr/bin/env python3
"""Benchmark: a WSD run continued across sessions against one session of the same total time (issues 13, 26).

    python bench/versions.py [--budget 60] [--sessions 2]

The README's CPU preset with `train.max_steps: auto` on tinyshakespeare: `--sessions` runs of `--budget`
seconds each in one output folder (each later one resumes with `train.resume: auto`, as a Kaggle version
with the earlier one attached does: from the stable-phase checkpoint, decaying at the end of its own
budget), then one run of the whole time in a fresh folder. Each run is its own `python -m kernel` process,
as each Kaggle version is, one after another; each line shows what its setup cost: `setup_s` (inside the
budget: from the run's start to its first step, data, model and the step-0 evaluation) and `process_s`
(the whole process, imports included, which a budget does not count).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from quality import COMMON, CORPUS  # noqa: E402

SETTINGS = {**COMMON, "data.text_glob": str(CORPUS), "train.max_steps": "auto", "train.checkpoint_interval": 0}


def session(out: str, budget: float, resume: str) -> dict:
    overrides = {**SETTINGS, "train.time_budget": budget, "train.resume": resume}
    command = [sys.executable, "-m", "kernel", "--config", "configs/llm_cpu.yaml", "--out", out]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    process_s = time.perf_counter() - started
    summary = json.loads((Path(out) / "summary.json").read_text(encoding="utf-8"))
    return {"val_loss": round(summary["val_loss"], 4), "steps": summary["steps"],
            "setup_s": round(summary["setup_s"], 1), "process_s": round(process_s, 1),
            "resumed_from": Path(summary["resumed_from"]).name if summary["resumed_from"] else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=60)
    parser.add_argument("--sessions", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        for number in range(1, args.sessions + 1):
            result = session(out, args.budget, "never" if number == 1 else "auto")
            print(json.dumps({"run": f"session {number} of {args.sessions} x {args.budget:g} s", **result}), flush=True)
    with tempfile.TemporaryDirectory() as out:
        result = session(out, args.budget * args.sessions, "never")
        print(json.dumps({"run": f"one session of {args.budget * args.sessions:g} s", **result}), flush=True)


if __name__ == "__main__":
    main()
