#!/usr/bin/env python3
"""Benchmark: validation loss reached in a fixed wall-clock budget, character-level tinyshakespeare.

    python bench/quality.py [--budget 64] [--only NAME] [--as-run]
    python bench/quality.py --try model.arch=llama --try model.n_layer=3 ...   # one setting of a sweep

Runs each setting through the real program (`kernel.main.run`) with `train.time_budget` = the budget, one
after another in this process, on ../shared/data/tinyshakespeare.txt (90/10 split, as nanoGPT). The
baseline is the `gpt2` preset with nanoGPT's README CPU recipe (4 x 128, context 64, batch 12, lr 1e-3 to
1e-4 cosine, 100 warm-up steps, 2000 steps, fp32). The budget covers the whole run (data preparation,
evaluation and checkpointing included), which is stricter than timing the training loop alone. By default
the runs skip intermediate evaluations, checkpoints and samples (COMMON); `--as-run` keeps each setting's
own, as the README's main command runs the preset (evaluations every 250 steps on 20 batches, checkpoints
every 500, a sample at each evaluation).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kernel.config import load_config, parse_overrides  # noqa: E402
from kernel.main import run  # noqa: E402

CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
AS_RUN = {"train.device": "cpu", "data.val_fraction": 0.1, "model.dropout": 0.0}
COMMON = {**AS_RUN, "train.eval_interval": 10**9, "train.eval_batches": 100, "train.checkpoint_interval": 0,
          "train.log_interval": 50, "sample.max_new_tokens": 0, "sample.eval_tokens": 0}
NANOGPT_CPU = {"model.arch": "gpt2", "model.n_layer": 4, "model.n_head": 4, "model.n_embd": 128,
               "model.block_size": 64, "train.batch_size": 12, "train.lr": 1e-3, "train.min_lr": 1e-4,
               "train.warmup_steps": 100, "train.max_steps": 2000, "train.beta2": 0.99, "train.weight_decay": 0.1,
               "train.grad_clip": 1.0, "train.dtype": "float32", "train.optimizer": "adamw"}
LLAMA_WSD = {**NANOGPT_CPU, "model.arch": "llama", "train.schedule": "wsd", "train.max_steps": 10**9,
             "train.dtype": "auto"}  # the run's length is the budget; dtype by the CPU rule
ADAMW_2X128 = {**LLAMA_WSD, "model.n_layer": 2, "train.batch_size": 16, "train.lr": 3e-3, "train.warmup_steps": 30,
               "train.decay_fraction": 0.2}
SETTINGS = {
    "baseline: gpt2, nanoGPT CPU recipe": NANOGPT_CPU,
    "llama 4x128 (the baseline's shape), lr 2e-3, wsd to the budget": {**LLAMA_WSD, "train.lr": 2e-3},
    "adamw (the previous CPU preset): llama 2x128, batch 16, lr 3e-3, 30 warm-up steps, wsd to the budget": {
        **ADAMW_2X128},
    # llm_cpu.yaml as it is (muon, batch 24, no clipping, 40% decay), to the budget: the preset has one place
    "best (the CPU preset): as above with muon, batch 24, no clipping, 40% decay": {"train.max_steps": 10**9},
    "the CPU preset with QK-norm": {"train.max_steps": 10**9, "model.qk_norm": True},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=64)
    parser.add_argument("--only", help="run only the settings whose name contains this")
    parser.add_argument("--as-run", action="store_true", help="keep each setting's evaluations, checkpoints and "
                        "samples (default: none until the end)")
    parser.add_argument("--try", dest="tried", action="append", default=[], metavar="KEY=VALUE",
                        help="run only one setting: the baseline recipe with these changes, as long as the budget "
                             "allows (no step limit); repeatable")
    args = parser.parse_args()
    if args.tried:
        SETTINGS.clear()
        SETTINGS["tried: " + " ".join(args.tried)] = {**NANOGPT_CPU, "train.max_steps": 10**9,
                                                     **parse_overrides(args.tried, "--try")}
    if not CORPUS.is_file():
        sys.exit(f"{CORPUS} is missing: this benchmark needs the shared tinyshakespeare corpus")
    for name, settings in SETTINGS.items():
        if args.only and args.only not in name:
            continue
        overrides = {**(AS_RUN if args.as_run else COMMON), **settings, "data.text_glob": str(CORPUS),
                     "train.time_budget": args.budget, "train.resume": "never"}
        with tempfile.TemporaryDirectory() as out:
            summary = run(load_config("llm_cpu.yaml", overrides), out)
        print(json.dumps({"setting": name, "val_loss": round(summary["val_loss"], 4), "steps": summary["steps"],
                          "wall_s": round(summary["wall_s"], 1), "setup_s": round(summary["setup_s"], 1),
                          "as_run": args.as_run, "dtype": summary["dtype"],
                          "tokens_per_s": round(summary["tokens_per_s"])}), flush=True)


if __name__ == "__main__":
    main()
