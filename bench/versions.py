#!/usr/bin/env python3
"""Benchmark: a WSD run continued across sessions against one session of the same total time (issue 13).

    python bench/versions.py [--budget 60] [--sessions 2]

The README's CPU preset with `train.max_steps: auto` on tinyshakespeare: `--sessions` runs of `--budget`
seconds each in one output folder (each later one resumes with `train.resume: auto`, as a Kaggle version
with the earlier one attached does: from the stable-phase checkpoint, decaying at the end of its own
budget), then one run of the whole time in a fresh folder. Same process, one after another.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kernel.config import load_config  # noqa: E402
from kernel.main import run  # noqa: E402
from quality import COMMON, CORPUS  # noqa: E402

SETTINGS = {**COMMON, "data.text_glob": str(CORPUS), "train.max_steps": "auto", "train.checkpoint_interval": 0}


def session(out: str, budget: float, resume: str) -> dict:
    summary = run(load_config("llm_cpu.yaml", {**SETTINGS, "train.time_budget": budget, "train.resume": resume}), out)
    return {"val_loss": round(summary["val_loss"], 4), "steps": summary["steps"],
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
