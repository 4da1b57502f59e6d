"""Every bad input gets the project's own error, naming the culprit, and damages nothing already written."""

import gzip
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from kernel.env import KernelError
from kernel.main import main
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An output folder holding a finished run: checkpoints, metrics, summary, tokenizer, cache."""
    out = tmp_path_factory.mktemp("finished") / "out"
    main("llm_cpu.yaml", {**TINY, "train.max_steps": 20}, out_dir=str(out))
    return out


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def case_inputs(root: Path, finished: Path) -> dict:
    """name -> (config, overrides, data_glob, expected words in the message)."""
    never = {**TINY, "train.resume": "never"}
    corrupt = write(root / "corrupt" / "ckpt_00000010.pt", b"not a checkpoint")
    write(root / "corrupt" / "ckpt_00000010.pt.sha256", "0" * 64)
    return {
        "unknown key": ("llm_cpu.yaml", {**TINY, "train.lrr": 1e-3}, "", ["'train.lrr'", "did you mean 'train.lr'"]),
        "wrong type": ("llm_cpu.yaml", {**TINY, "model.n_layer": "four"}, "", ["'model.n_layer'", "integer"]),
        "impossible width": ("llm_cpu.yaml", {**TINY, "model.n_embd": 65}, "",
                             ["'model.n_embd' (65)", "divisible by 'model.n_head'"]),
        "missing config": ("nope.yaml", {}, "", ["'nope.yaml' not found"]),
        "broken yaml": (str(write(root / "broken.yaml", "model: [1, 2\n")), {}, "", ["broken.yaml", "not valid YAML"]),
        "bad duration": ("llm_cpu.yaml", {**TINY, "train.time_budget": "soon"}, "", ["'train.time_budget'", "'soon'"]),
        "float16 on cpu": ("llm_cpu.yaml", {**never, "train.dtype": "float16"}, "", ["train.dtype=float16", "CUDA"]),
        "no file matches": ("llm_cpu.yaml", never, str(root / "nothing" / "**" / "*.txt"), ["matches no file", "nothing"]),
        "all files empty": ("llm_cpu.yaml", never, str(write(root / "empty" / "a.txt", "")), ["empty: ", "a.txt"]),
        "only binary files": ("llm_cpu.yaml", never, str(write(root / "binary" / "b.txt", b"\x00\x01\x02")),
                              ["binary (NUL bytes), not text: ", "b.txt"]),
        "validation too short": ("llm_cpu.yaml", never, str(write(root / "short" / "s.txt", "tiny text " * 20)),
                                 ["validation split has", "model.block_size"]),
        "bpe vocab too large": ("llm_cpu.yaml", {**never, "tokenizer.mode": "bpe_simple", "tokenizer.vocab_size": 5000},
                                str(write(root / "small" / "s.txt", "a small corpus, " * 300)),
                                ["tokenizer.vocab_size=5000", "more than this corpus supports"]),
        "bpe vocab below bytes": ("llm_cpu.yaml", {**never, "tokenizer.mode": "bpe_simple", "tokenizer.vocab_size": 100},
                                  "", ["'tokenizer.vocab_size' must be >= 257"]),
        "hf without a name": ("llm_cpu.yaml", {**never, "tokenizer.mode": "hf"}, "", ["'tokenizer.pretrained_name'"]),
        "hf folder without tokenizer": ("llm_cpu.yaml", {**never, "tokenizer.mode": "hf",
                                                         "tokenizer.pretrained_name": str(root)},
                                        "", [str(root), "could not be loaded from the folder"]),
        "resume path missing": ("llm_cpu.yaml", {**TINY, "train.resume": str(root / "gone.pt")}, "",
                                ["gone.pt", "no such checkpoint"]),
        "corrupt checkpoint": ("llm_cpu.yaml", {**TINY, "train.resume": str(corrupt)}, "",
                               ["ckpt_00000010.pt", "does not match its checksum"]),
        "model shape changed": ("llm_cpu.yaml", {**TINY, "model.n_layer": 3, "train.max_steps": 40}, "",
                                ["model.n_layer: 2 -> 3", "train.resume=never"]),
        "misspelled synonym": ("llm_cpu.yaml", {**TINY, "train.lernin_rate": 1e-3}, "",
                               ["'train.lernin_rate'", "did you mean 'train.lr'"]),
        "one-character corpus": ("llm_cpu.yaml", never, str(write(root / "one" / "c.txt", "a")),
                                 ["1 character(s) in all, too short a corpus", "add text"]),
        "truncated gzip": ("llm_cpu.yaml", never, str(write(root / "gz" / "c.txt.gz", truncated_gzip())),
                           ["c.txt.gz: a truncated or corrupt compressed file"]),
        "damaged parquet": ("llm_cpu.yaml", never, str(damaged_parquet(root / "pq" / "c.parquet")),
                            ["c.parquet: a damaged Parquet file"]),
        "a tokenizer folder": ("llm_cpu.yaml", never, str(tokenizer_folder(root / "mytok") / "*"),
                               ["no usable text", "in the model or tokenizer folder", "tokenizer_config.json"]),
        "budget below the reserve": ("llm_cpu.yaml", {**never, "train.time_budget": 0.5}, "",
                                     ["train.time_budget=0.5s is spent before the run can start"]),
    }


def truncated_gzip() -> bytes:
    """A .gz cut off halfway, as by an interrupted download."""
    whole = gzip.compress("".join(f"line {i}: {i * i}\n" for i in range(20000)).encode())
    return whole[:len(whole) // 2]


def damaged_parquet(path: Path) -> Path:
    """A Parquet file whose compressed column data is overwritten: its footer still reads, its pages do not."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": [f"record {i} " * 20 for i in range(2000)]}), path, compression="snappy")
    data = bytearray(path.read_bytes())
    data[8:len(data) // 2] = bytes(len(data) // 2 - 8)  # the first pages, past the magic bytes
    path.write_bytes(bytes(data))
    return path


def tokenizer_folder(folder: Path) -> Path:
    """What the README tells a user to attach for tokenizer.mode=hf: a folder of tokenizer files."""
    write(folder / "tokenizer.json", '{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}')
    write(folder / "tokenizer_config.json", '{"model_max_length": 1024}')
    return folder


def test_at_least_fifteen_bad_inputs_each_get_a_clear_error_and_damage_nothing(tmp_path, finished_run):
    cases = case_inputs(tmp_path / "inputs", finished_run)
    assert len(cases) >= 15
    before = snapshot(finished_run)
    for name, (config, overrides, data_glob, expected) in cases.items():
        with pytest.raises(KernelError) as err:
            main(config, overrides, data_glob, str(finished_run))
        for words in expected:
            assert words in str(err.value), f"{name}: {err.value}"
        after = snapshot(finished_run)
        damaged = [path for path, digest in before.items() if after.get(path) != digest]
        assert not damaged, f"{name} changed {damaged}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["misspelled synonym", "truncated gzip", "damaged parquet", "a tokenizer folder",
                                  "one-character corpus"])
def test_the_real_command_line_says_each_in_one_line_with_exit_code_2(tmp_path, finished_run, name):
    config, overrides, data_glob, expected = case_inputs(tmp_path / "inputs", finished_run)[name]
    settings = {**overrides, **({"data.text_glob": data_glob} if data_glob else {})}
    arguments = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    before = snapshot(finished_run)
    done = subprocess.run([sys.executable, "-m", "kernel", "--config", config, *arguments, "--out", str(finished_run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: "), done.stderr
    assert all(words in errors[0] for words in expected) and "Traceback" not in done.stdout + done.stderr
    unchanged = lambda files: {path: digest for path, digest in files.items() if path != ".lock"}  # its PID
    assert unchanged(snapshot(finished_run)) == unchanged(before)
