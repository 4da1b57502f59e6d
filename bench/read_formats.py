#!/usr/bin/env python3
"""Benchmark: reading speed per input format, and building the token cache (issue 12).

    python bench/read_formats.py [--mb 500] [--workdir /tmp/read-formats] [--cache-gb 1]

Writes the same English-like text as a .txt file, as JSON Lines (one record per ~2 KB document, with an id
and a label beside the text) and as CSV (the same records, quoted), `--mb` megabytes each, then for each
file, in a fresh process: one pass of `measure` (what the data section does first: decode, parse, count
documents and characters) with its MB/s and the process's peak RSS. Then the whole token-cache build
(`prepare_data`, char tokenizer, one worker per core) on `--cache-gb` of JSON Lines: how long a Kaggle
session spends re-creating the cache it no longer keeps in the outputs.
"""

import argparse
import csv
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the a of to and in is was for on that with as it by at from this be or are an which not had but "
         "model token learns text kaggle version dataset record document every field column quoted").split()


def documents(total_bytes: int, seed: int = 0):
    rng = random.Random(seed)
    written = 0
    while written < total_bytes:
        words = rng.choices(WORDS, k=rng.randint(200, 500))
        text = " ".join(words).capitalize() + ".\n" + " ".join(rng.choices(WORDS, k=40)) + ", \"quoted\"."
        written += len(text)
        yield text


def write_inputs(folder: Path, megabytes: int) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: folder / f"corpus_{megabytes}mb.{kind}" for kind in ("txt", "jsonl", "csv")}
    if all(p.exists() for p in paths.values()):
        return paths
    with open(paths["txt"], "w") as txt, open(paths["jsonl"], "w") as jsonl, \
            open(paths["csv"], "w", newline="") as table:
        rows = csv.writer(table)
        rows.writerow(["id", "text", "label"])
        for i, text in enumerate(documents(megabytes << 20)):
            txt.write(text + "\n\n")
            jsonl.write(json.dumps({"id": i, "text": text, "label": i % 5}) + "\n")
            rows.writerow([i, text, i % 5])
    return paths


def measure_one(path: str) -> None:
    """In a fresh process: one `measure` pass over the file; prints MB/s and peak RSS as JSON."""
    sys.path.insert(0, str(ROOT))
    from kernel.inputs import list_sources
    from kernel.data import measure
    _, sources, _ = list_sources(path)
    started = time.perf_counter()
    found = measure(sources)
    seconds = time.perf_counter() - started
    size = os.path.getsize(path) / 2**20
    print(json.dumps({"file": Path(path).suffix, "MB": round(size), "documents": found["documents"],
                      "seconds": round(seconds, 1), "MB_per_s": round(size / seconds, 1),
                      "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}), flush=True)


def build_cache(path: str, cache: str) -> None:
    sys.path.insert(0, str(ROOT))
    from kernel.config import load_config
    from kernel.data import prepare_data
    config = load_config("llm_cpu.yaml", {"data.text_glob": path})
    started = time.perf_counter()
    data = prepare_data(config, cache)
    seconds = time.perf_counter() - started
    size = os.path.getsize(path) / 2**20
    print(json.dumps({"cache_build": Path(path).name, "MB": round(size), "seconds": round(seconds, 1),
                      "MB_per_s": round(size / seconds, 1), "tokens": int(data.train.size + data.val.size),
                      "workers": os.cpu_count(),
                      "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--cache-gb", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/read-formats"))
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure_one(args.measure)
    if args.build:
        return build_cache(args.build, str(args.workdir / "cache"))
    for path in write_inputs(args.workdir, args.mb).values():
        subprocess.run([sys.executable, __file__, "--measure", str(path)], check=True)
    if args.cache_gb:
        big = write_inputs(args.workdir, int(args.cache_gb * 1024))["jsonl"]
        subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--build", str(big)], check=True)


if __name__ == "__main__":
    main()
