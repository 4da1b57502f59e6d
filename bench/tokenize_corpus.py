#!/usr/bin/env python3
"""Benchmark: tokenize a large corpus with bpe_simple; MB/s and peak RSS, at two corpus sizes.

    python bench/tokenize_corpus.py --kind prose --sizes 100 1000
    python bench/tokenize_corpus.py --kind code --sizes 100

Two corpora, built on disk (64 MB files) from text every Python installation has offline:
* `prose`: English-like text that never repeats: words and punctuation drawn at random with the
  frequencies they have in pydoc's help topics and the standard library's docstrings (a unigram model,
  seeded), in lines and paragraphs. Zipf-distributed like real prose, without a repeating period.
* `code`: the standard library's source files (tests included) and pydoc's help topics, about 40 MB that
  repeats: a hard case, full of identifiers seen once.
Each size runs `prepare_data` in a fresh process (so peak RSS is its own; workers separately): BPE
training on the bounded sample, then the streaming, parallel encoding into token files. In the same
process, the reference: the `tokenizers` library's own `encode_batch_fast` (all cores) over the first
100 MB of the same files with the same tokenizer.
"""

import argparse
import json
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILE_BYTES = 64 << 20


def base_text() -> str:
    from pydoc_data.topics import topics

    lib = Path(sysconfig.get_paths()["stdlib"])
    parts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(lib.rglob("*.py"))
             if "site-packages" not in p.parts]
    parts += [topics[name] for name in sorted(topics)]
    return "\n\n".join(parts)


def docstrings_text() -> str:
    import ast
    from pydoc_data.topics import topics

    lib = Path(sysconfig.get_paths()["stdlib"])
    docs = [topics[name] for name in sorted(topics)]
    for path in sorted(p for p in lib.rglob("*.py") if "site-packages" not in p.parts):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        docs += [d for node in ast.walk(tree) if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
                 and (d := ast.get_docstring(node))]
    return "\n".join(docs)


def write_prose(folder: Path, megabytes: int) -> None:
    import re
    from collections import Counter

    import numpy as np

    counts = Counter(re.findall(r"[A-Za-z]+|[0-9]+|[.,;:()]", docstrings_text()))
    words = np.array(list(counts))
    probabilities = np.array(list(counts.values()), dtype=np.float64)
    probabilities /= probabilities.sum()
    rng = np.random.default_rng(0)
    written, index = 0, 0
    while written < megabytes << 20:
        target, parts, size = min(FILE_BYTES, (megabytes << 20) - written), [], 0
        while size < target:
            rows = words[rng.choice(len(words), size=(50_000, 14), p=probabilities)]
            ends = np.where(rng.random(len(rows)) < 0.1, "\n\n", "\n")
            block = "".join(" ".join(row) + end for row, end in zip(rows.tolist(), ends.tolist()))
            parts.append(block)
            size += len(block)
        data = "".join(parts).encode("utf-8")[:target]
        (folder / f"part{index:04d}.txt").write_bytes(data)
        written, index = written + len(data), index + 1


def build_corpus(folder: Path, megabytes: int, kind: str) -> None:
    if (folder / "done").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "prose":
        write_prose(folder, megabytes)
        (folder / "done").write_text("ok")
        return
    base = base_text().encode("utf-8")
    written, index = 0, 0
    while written < megabytes << 20:
        size = min(FILE_BYTES, (megabytes << 20) - written)
        data = (base * (size // len(base) + 2))[(index * 7_919_017) % len(base):][:size]
        (folder / f"part{index:04d}.txt").write_bytes(data)
        written, index = written + size, index + 1
    (folder / "done").write_text("ok")


def measure(folder: Path, vocab: int, out: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from kernel.config import load_config
    from kernel.data import prepare_data

    config = load_config("llm_cpu.yaml", {"data.text_glob": str(folder / "*.txt"), "tokenizer.mode": "bpe_simple",
                                          "tokenizer.vocab_size": vocab})
    started = time.perf_counter()
    data = prepare_data(config, out)
    total = time.perf_counter() - started
    megabytes = data.stats["bytes"] / 2**20
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    # The reference, same process, same tokenizer: the library's own batch encoder on the first 100 MB.
    files = sorted(folder.glob("*.txt"))
    text, budget = [], 100 << 20
    for path in files:
        chunk = path.read_text(encoding="utf-8")[: budget - sum(map(len, text))]
        text.append(chunk)
        if sum(map(len, text)) >= budget:
            break
    pieces = [t[i : i + (1 << 20)] for t in text for i in range(0, len(t), 1 << 20)]
    reference_mb = sum(len(p.encode("utf-8")) for p in pieces) / 2**20
    started = time.perf_counter()
    data.tokenizer.backend.encode_batch_fast(pieces)
    reference_s = time.perf_counter() - started
    return {"corpus_mb": round(megabytes, 1), "tokens": data.stats["train_tokens"] + data.stats["val_tokens"],
            "tokenizer_train_s": data.stats["tokenizer_seconds"], "encode_s": data.stats["encode_seconds"],
            "total_s": round(total, 1), "encode_mb_per_s": round(megabytes / data.stats["encode_seconds"], 1),
            "end_to_end_mb_per_s": round(megabytes / total, 1),
            "peak_rss_mb_main": round(peak_self), "peak_rss_mb_worker": round(peak_workers),
            "reference_tokenizers_encode_batch_mb_per_s": round(reference_mb / reference_s, 1),
            "speedup_vs_reference": round((megabytes / data.stats["encode_seconds"]) / (reference_mb / reference_s), 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000], help="corpus sizes in MB")
    parser.add_argument("--kind", choices=["prose", "code"], default="prose")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kernel-bench-corpus"))
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.vocab, args.workdir / "cache" / args.measure.name)))
        return
    for megabytes in args.sizes:
        folder = args.workdir / f"{args.kind}-{megabytes}mb"
        build_corpus(folder, megabytes, args.kind)
        done = subprocess.run([sys.executable, __file__, "--measure", str(folder), "--vocab", str(args.vocab),
                               "--workdir", str(args.workdir)], capture_output=True, text=True, check=True)
        print(json.dumps({"kind": args.kind, **json.loads(done.stdout.strip().splitlines()[-1])}), flush=True)


if __name__ == "__main__":
    main()
