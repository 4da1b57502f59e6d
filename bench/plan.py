#!/usr/bin/env python3
"""Benchmark: the planned model (`model.size: auto`) against the fixed CPU preset, at the same budget (issue 13).

    python bench/plan.py [--budgets 64 300] [--corpora shakespeare code] [--only NAME] [--try KEY=VALUE ...]

For each corpus and budget, in this one process and one after another: the README's CPU preset as shipped
(`llm_cpu.yaml`: 2 x 128, its own max_steps or the budget, whichever ends first), the same shape with
`train.max_steps: auto` (the WSD decay ends with the budget), the planner (`model.size: auto` and
`max_steps: auto`), and nanoGPT's README CPU recipe (the `gpt2` 4 x 128 baseline of bench/quality.py).
Every run is the real program (`kernel.main.run`), data preparation, the plan, evaluation and checkpoints
inside the budget. Corpora: `shakespeare` (../shared/data/tinyshakespeare.txt, what the presets were tuned on)
and `code` (the Python standard library's own source, ~2 MB of `.py` files the presets never saw; it ships
with every Python, so the benchmark needs no download). `--try` adds its settings to every run.
"""

import argparse
import json
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kernel.config import load_config, parse_overrides  # noqa: E402
from kernel.main import run  # noqa: E402
from quality import COMMON, NANOGPT_CPU  # noqa: E402  (bench/quality.py: the shared recipe)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPORA = {"shakespeare": str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"),
           "code": str(STDLIB / "[a-m]*.py")}  # ~2 MB: the top-level modules a..m
PRESET = {"train.max_steps": "auto"}
SETTINGS = {
    "preset as shipped (llm_cpu.yaml, its own max_steps)": {},
    "preset 2 x 128, max_steps auto": PRESET,
    "model.size=auto": {**PRESET, "model.size": "auto"},
    "nanoGPT CPU recipe (gpt2 4 x 128)": {**NANOGPT_CPU, "train.max_steps": 10**9},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", type=float, nargs="+", default=[64, 300])
    parser.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    parser.add_argument("--only", help="run only the settings whose name contains this")
    parser.add_argument("--try", dest="tried", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    extra = parse_overrides(args.tried, "--try") if args.tried else {}
    for corpus in args.corpora:
        for budget in args.budgets:
            for name, settings in SETTINGS.items():
                if args.only and args.only not in name:
                    continue
                overrides = {**COMMON, **settings, **extra, "data.text_glob": CORPORA[corpus],
                             "train.time_budget": budget, "train.resume": "never"}
                with tempfile.TemporaryDirectory() as out:
                    summary = run(load_config("llm_cpu.yaml", overrides), out)
                plan = summary.get("plan") or {}
                print(json.dumps({"corpus": corpus, "budget": budget, "setting": name,
                                  "val_loss": round(summary["val_loss"], 4), "val_bpb": round(summary["val_bpb"], 4),
                                  "steps": summary["steps"], "params": summary["params"],
                                  "chosen": plan.get("chosen"), "plan_s": plan.get("plan_seconds"),
                                  "wall_s": round(summary["wall_s"], 1), "tokens_per_s": round(summary["tokens_per_s"]),
                                  "dtype": summary["dtype"]}), flush=True)


if __name__ == "__main__":
    main()
