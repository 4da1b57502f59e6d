"""Reliability, round 2: no silent wrong runs, no tracebacks, nothing left behind (issue 16)."""

import dataclasses
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kernel.checkpoint as checkpoint_module
import kernel.data as data_module
import kernel.main as main_module
import kernel.train as train_module
from kernel.checkpoint import list_checkpoints
from kernel.config import ConfigError, load_config
from kernel.sources import Source
from kernel.inputs import find_text_files
from kernel.env import FILE_MODE, KernelError
from kernel.main import run
from kernel.progress import RunStopped, StopRequests
from kernel.sample import sample_blocks, sample_from_run
from kernel.env import write_json_atomic
from tests.test_reliability import ROOT, metrics_without_timing, start_cli, wait_for_step


def dead_pid() -> int:
    """The PID of a process that has exited (its debris is fair game)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# --- A run never dies after the training it paid for -------------------------------------------------------

def wordpiece_folder(folder: Path) -> Path:
    """A BERT-style tokenizer: no end-of-text token, and whitespace ("\\n") encodes to nothing."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]", "[PAD]", "[CLS]", "[SEP]"])
    backend.train_from_iterator(list(topics.values())[:50], trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(str(folder))
    return folder


def test_an_hf_tokenizer_that_encodes_the_prompt_to_nothing_still_ends_the_run_with_its_outputs(tmp_path, tiny, capsys):
    folder = wordpiece_folder(tmp_path / "wordpiece")
    summary = run(tiny(tokenizer__mode="hf", tokenizer__pretrained_name=str(folder), train__max_steps=10),
                  tmp_path / "out")
    out = tmp_path / "out"
    assert summary["steps"] == 10 and json.loads((out / "summary.json").read_text())["steps"] == 10
    assert (out / "hf" / "config.json").is_file() and list_checkpoints(out / "checkpoints")
    printed = capsys.readouterr().out
    assert "[warn] could not write samples.txt: the prompt '\\n' encodes to no tokens" in printed
    assert not (out / "samples.txt").exists() and "samples.txt" not in printed.splitlines()[-1]  # the file list
    assert "=== sample 1 | prompt 'the' ===" in sample_from_run(out, ["the"], max_new_tokens=5)
    with pytest.raises(KernelError, match=r"the prompt '\\n' encodes to no tokens.*give prompts with text"):
        sample_from_run(out, ["\n"], max_new_tokens=5)


def test_summary_json_holds_null_for_numbers_json_cannot_hold(tmp_path):
    write_json_atomic(tmp_path / "summary.json", {"train_loss": float("nan"), "x": [float("inf"), 1.5]})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"train_loss": None, "x": [None, 1.5]}


# --- Resuming with another tokenizer is an error ---------------------------------------------------------

def test_resume_refuses_a_changed_tokenizer_mode_naming_old_and_new(tmp_path, tiny):
    run(tiny(train__max_steps=10), tmp_path)
    with pytest.raises(KernelError, match=r"tokenizer changed \(tokenizer.mode: 'char' -> 'bpe_simple'"):
        run(tiny(train__max_steps=20, tokenizer__mode="bpe_simple", tokenizer__vocab_size=300), tmp_path)
    assert (tmp_path / "config.yaml").read_text().count("bpe_simple") == 0  # nothing rewritten


def test_an_hf_checkpoint_carries_its_tokenizer_and_notices_a_replaced_one(tmp_path, tiny):
    folder = wordpiece_folder(tmp_path / "wordpiece")
    config = tiny(tokenizer__mode="hf", tokenizer__pretrained_name=str(folder), train__max_steps=10)
    first = run(config, tmp_path / "out")
    shutil.rmtree(folder)  # gone: the checkpoint's own copy is used, offline
    resumed = run(tiny(tokenizer__mode="hf", tokenizer__pretrained_name=str(folder), train__max_steps=20),
                  tmp_path / "out")
    assert resumed["steps"] == 20 and resumed["data"]["vocab_size"] == first["data"]["vocab_size"]
    # Another tokenizer under the same name: an error naming it, not a silent switch.
    backend = json.loads((tmp_path / "out" / "tokenizer" / "tokenizer.json").read_text())
    backend["model"]["vocab"]["zzzz"] = len(backend["model"]["vocab"])
    folder.mkdir()
    shutil.copytree(tmp_path / "out" / "tokenizer", folder, dirs_exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(backend))
    with pytest.raises(KernelError, match="is not the one the checkpoint was trained with"):
        run(tiny(tokenizer__mode="hf", tokenizer__pretrained_name=str(folder), train__max_steps=30),
            tmp_path / "out")


# --- One run per output folder ----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_on_a_busy_output_folder_is_refused_and_a_killed_run_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "out"
    first = start_cli(out, "--set", "train.max_steps=100000", "--set", "train.checkpoint_interval=5")
    try:
        wait_for_step(out, 6, first)
        second = subprocess.run([sys.executable, "-m", "kernel", "--config", "configs/llm_cpu.yaml", "--out", str(out)],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"another run (PID {first.pid}) is using the output folder {out}" in second.stderr
    finally:
        first.kill()  # kill -9: the operating system releases the lock
        first.wait()
    third = start_cli(out, "--set", "train.max_steps=12", "--set", "train.checkpoint_interval=5")
    output, _ = third.communicate(timeout=300)
    assert third.returncode == 0, output
    assert "resumed from" in output


# --- Sources ------------------------------------------------------------------------------------------

def test_a_symlink_loop_reads_each_file_once(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("first")
    (corpus / "sub" / "b.txt").write_text("second")
    os.symlink(corpus, corpus / "sub" / "loop")
    os.symlink(corpus / "a.txt", corpus / "alias.txt")
    found = find_text_files(str(corpus / "**" / "*.txt"))
    assert [p.name for p in found] == ["a.txt", "b.txt"]


def test_two_symlink_loops_under_a_double_star_read_each_folder_once(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    for folder in ("a", "a/b", "c"):
        (corpus / folder).mkdir(parents=True)
        (corpus / folder / "text.txt").write_text(folder)
    os.symlink(corpus, corpus / "a" / "b" / "up")  # two loops: glob(recursive=True) expands them without end
    os.symlink(corpus / "a", corpus / "c" / "back")
    reads = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": reads.append(path) or real_scandir(path))
    found = find_text_files(str(corpus / "**" / "*.txt"))
    assert [p.relative_to(corpus).as_posix() for p in found] == ["a/b/text.txt", "a/text.txt", "c/text.txt"]
    assert len(reads) == 4  # corpus, a, a/b, c: each real folder once


def test_an_existing_path_with_glob_characters_is_taken_literally(tmp_path):
    path = tmp_path / "novel [1].txt"
    path.write_text("text")
    assert find_text_files(str(path)) == [path]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_files_with_a_bom_are_read_as_text(tmp_path, encoding):
    text = "Ünïcode text, written by a Windows tool.\nSecond line."
    path = tmp_path / "windows.txt"
    bom = {"utf-16": b"", "utf-16-be": b"\xfe\xff", "utf-32": b""}[encoding]  # Python writes LE BOMs itself
    path.write_bytes(bom + text.encode(encoding))
    source = Source(str(path), path=path)
    assert not source.looks_binary() and "".join(source.blocks()) == text


# --- Signals outside the training loop ---------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_during_data_preparation_stops_in_one_line_and_leaves_no_half_built_cache(tmp_path):
    corpus = tmp_path / "big.txt"
    words = ["alpha ", "beta ", "gamma\n", "delta ", "epsilon. "] * 1_000_000
    corpus.write_text("".join(words))  # ~30 MB: tokenizing takes seconds
    out = tmp_path / "out"
    process = start_cli(out, "--set", f"data.text_glob={corpus}", "--set", "data.workers=2")
    deadline = time.time() + 60
    while time.time() < deadline and not list((out / "cache").glob("*.partial-*")):
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output and "BrokenPipe" not in output
    assert output.strip().splitlines()[-1].startswith("stopped: stopped by SIGTERM while preparing the run")
    assert not list((out / "cache").glob("*.partial-*")) and not (out / "checkpoints").exists()


RAISING_INPUT_LOOP = """
import sys
from kernel.data import ordered_map
from kernel.train import StopRequests

def pieces():
    yield 1
    raise ValueError("a bad record")

with StopRequests():  # the run's own handlers are set while data is prepared
    for _ in range(int(sys.argv[1])):
        try:
            list(ordered_map(abs, pieces(), 2))
        except ValueError:
            pass
print("all pools closed")
"""


@pytest.mark.slow
def test_bad_input_found_while_workers_start_never_hangs_the_run(tmp_path):
    # Seen in CI: an error from the input right after the tokenizing pool forked; the pool's shutdown
    # signalled workers that still ran the parent's handler (or held a queue lock) and then waited forever.
    script = tmp_path / "loop.py"
    script.write_text(RAISING_INPUT_LOOP)
    done = subprocess.run([sys.executable, str(script), "200"], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.strip() == "all pools closed", done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def kill_this_worker(value: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)  # what the system's out-of-memory killer does
    return value


def test_a_tokenizing_worker_killed_by_the_system_is_one_clear_error_not_a_hang():
    with pytest.raises(KernelError, match="data.workers"):
        list(data_module.ordered_map(kill_this_worker, iter(range(4)), 2))


@pytest.mark.slow
def test_sigterm_during_final_sampling_cuts_it_to_one_short_sample_per_prompt(tmp_path):
    out = tmp_path / "out"
    process = start_cli(out, "--set", "train.max_steps=10", "--set", "sample.num_samples=100000",
                        "--set", "sample.max_new_tokens=300", "--set", "sample.eval_tokens=16")
    deadline = time.time() + 120
    # the export's folder appears in one rename when it is complete; sampling 100,000 texts comes next
    while time.time() < deadline and not (out / "hf" / "config.json").exists() and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "Traceback" not in output and "[stop] the final samples cut short after SIGTERM" in output
    assert json.loads((out / "summary.json").read_text())["steps"] == 10
    final = [block for step, block in sample_blocks((out / "samples.txt").read_text()) if step is None]
    assert len(final) == 1 and final[0].startswith("=== sample 1 | prompt '\\n' ===")  # one prompt, one sample
    assert len(final[0].split("===\n", 1)[1].rstrip("\n")) <= 17  # the prompt's newline + 16 char tokens


def test_a_signal_after_the_last_output_changes_nothing_but_one_before_stops(monkeypatch):
    outer = StopRequests()
    with outer:
        with StopRequests() as inner:
            with pytest.raises(RunStopped):  # the work is not done: a signal stops it
                os.kill(os.getpid(), signal.SIGTERM)
            inner.finish()
            os.kill(os.getpid(), signal.SIGTERM)  # the last output is written: nothing happens
        os.kill(os.getpid(), signal.SIGINT)  # back in the command line's requests, finished with the run
    assert outer.finished and inner.signal_name == "SIGTERM"


@pytest.mark.slow
def test_a_run_signalled_right_after_its_last_line_exits_zero(tmp_path):
    process = start_cli(tmp_path / "out", "--set", "train.max_steps=10")
    for line in process.stdout:
        if line.startswith("Files in "):  # the summary's last line: the run's work is done
            process.send_signal(signal.SIGTERM)
            break
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 10


def signal_myself_then(original, at_call: int = 1, signum: int = signal.SIGTERM):
    """`original`, whose `at_call`-th call is preceded by a signal to this process (the run's StopRequests
    handler gets it, as from Kaggle, Ctrl-C or a notebook's interrupt)."""
    calls = 0

    def wrapped(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == at_call:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)
    return wrapped


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])  # SIGINT: Ctrl-C, a notebook's interrupt
def test_a_first_signal_while_the_outputs_are_written_lets_them_finish_in_short_form(tmp_path, tiny, monkeypatch,
                                                                                      capsys, signum):
    monkeypatch.setattr(main_module, "export_hf", signal_myself_then(main_module.export_hf, signum=signum))
    summary = run(tiny(train__max_steps=10, sample__num_samples=3, sample__eval_tokens=8), tmp_path)
    printed = capsys.readouterr().out
    assert f"[stop] {signal.Signals(signum).name} received: the outputs are finished in short form" in printed
    assert summary["stopped_by"] == "max_steps" and (tmp_path / "loss.png").is_file()
    assert (tmp_path / "hf" / "model.safetensors").is_file()  # the export the signal came during: finished
    final = [block for step, block in sample_blocks((tmp_path / "samples.txt").read_text()) if step is None]
    assert len(final) == 1 and len(final[0].split("===\n", 1)[1].rstrip("\n")) <= 9  # one short sample


def test_a_second_signal_skips_the_outputs_left_but_never_the_checkpoint_or_summary(tmp_path, tiny, monkeypatch,
                                                                                   capsys):
    monkeypatch.setattr(train_module, "train_step", signal_myself_then(train_module.train_step, at_call=6))
    monkeypatch.setattr(main_module, "export_hf", signal_myself_then(main_module.export_hf))  # the second
    summary = run(tiny(train__max_steps=100), tmp_path)
    printed = capsys.readouterr().out
    assert summary["stopped_by"] == "signal (SIGTERM)" and summary["steps"] == 6  # the step under way finishes
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == "ckpt_00000006.pt"
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 6 and (tmp_path / "loss.png").is_file()
    assert "[stop] the hf/ export skipped after a second stop signal (SIGTERM)" in printed
    assert "[stop] samples.txt skipped after a second stop signal" in printed and not (tmp_path / "hf").exists()
    assert "=== sample" not in (tmp_path / "samples.txt").read_text()  # only the samples taken at evaluations


# --- Errors, not tracebacks -------------------------------------------------------------------------------

def test_a_full_disk_while_building_the_token_cache_is_one_clear_error(tmp_path, tiny, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(data_module, "write_token_files", full_disk)
    with pytest.raises(KernelError, match=r"could not write the token cache in .*cache: No space left on device; "
                                          r"the disk is full.*data.cache_dir"):
        run(tiny(), tmp_path)
    assert not list((tmp_path / "cache").glob("tokens-*"))


def test_a_folder_without_write_permission_is_not_reported_as_a_full_disk(tmp_path, tiny, monkeypatch):
    original = checkpoint_module.write_atomic

    def immutable(path, data):
        if path.suffix == ".pt":
            raise OSError(errno.EPERM, os.strerror(errno.EPERM), str(path))
        return original(path, data)

    monkeypatch.setattr(checkpoint_module, "write_atomic", immutable)
    with pytest.raises(KernelError) as err:
        run(tiny(train__max_steps=5), tmp_path)
    assert "Operation not permitted" in str(err.value) and "not writable" in str(err.value)
    assert "disk is full" not in str(err.value)


def test_a_config_file_that_is_not_utf8_is_one_clear_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  lr: 0.001  # café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text .*save it as UTF-8"):
        load_config(str(path))


def test_a_too_short_corpus_leaves_no_cache_in_the_output_folder(tmp_path, tiny):
    text = tmp_path / "short.txt"
    text.write_text("just a few words")
    with pytest.raises(KernelError, match="fewer than one window"):
        run(tiny(data__text_glob=str(text)), tmp_path / "out")
    assert not (tmp_path / "out" / "cache").exists()


# --- Debris and waste -------------------------------------------------------------------------------------

def test_debris_of_a_crashed_run_is_removed_and_only_that(tmp_path, tiny):
    out = tmp_path / "out"
    run(tiny(train__max_steps=10), out)
    pid = dead_pid()
    debris = [out / "checkpoints" / ".ckpt_00000020.pt.x1y2.tmp", out / "checkpoints" / "ckpt_00000099.pt.sha256",
              out / ".summary.json.a1b2.tmp"]
    for path in debris:
        path.write_text("left by a killed run")
    (out / f"hf.partial-{pid}").mkdir()
    (out / "cache" / f"tokens-0123.partial-{pid}").mkdir()
    (out / "notes.txt").write_text("the user's own file")
    summary = run(tiny(train__max_steps=20), out)
    assert summary["steps"] == 20 and (out / "notes.txt").read_text() == "the user's own file"
    assert not any(p.exists() for p in debris)
    assert not (out / f"hf.partial-{pid}").exists() and not list((out / "cache").glob("*.partial-*"))


def test_a_resumed_run_reuses_the_token_cache_and_a_changed_split_replaces_it(tmp_path, tiny):
    run(tiny(train__max_steps=10), tmp_path)
    resumed = run(tiny(train__max_steps=20), tmp_path)
    assert resumed["data"]["cached"] and len(list((tmp_path / "cache").iterdir())) == 1
    run(tiny(train__max_steps=10, data__val_fraction=0.2, train__resume="never"), tmp_path / "other")
    shutil.copytree(tmp_path / "other" / "cache", tmp_path / "cache", dirs_exist_ok=True)  # an old cache
    fresh = run(tiny(train__max_steps=30, data__val_fraction=0.3, train__resume="never"), tmp_path)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(fresh["data"]["cache"]).name]


def straight_run(tmp_path: Path, tiny):
    """A 30-step run with checkpoints every 10 steps in tmp_path/straight; returns its config."""
    config = tiny(train__max_steps=30, train__log_interval=7, train__checkpoint_interval=10,
                  train__keep_checkpoints=5)
    run(config, tmp_path / "straight")
    return config


def copy_stopped_at_10(tmp_path: Path, name: str) -> Path:
    """A copy of the straight run as if it had stopped at step 10 (its later checkpoints gone)."""
    copy = tmp_path / name
    shutil.copytree(tmp_path / "straight", copy)
    for step in (20, 30):
        (copy / "checkpoints" / f"ckpt_{step:08d}.pt").unlink()
    return copy


def test_a_resumed_run_writes_the_same_metrics_as_a_straight_one(tmp_path, tiny):
    config = straight_run(tmp_path, tiny)
    stopped = copy_stopped_at_10(tmp_path, "stopped")
    run(config, stopped)
    assert metrics_without_timing(stopped) == metrics_without_timing(tmp_path / "straight")
    # the samples at evaluations too: those up to the checkpoint kept, the later ones taken again, the same
    assert (stopped / "samples.txt").read_text() == (tmp_path / "straight" / "samples.txt").read_text()


def test_a_run_resumed_from_another_folders_checkpoint_continues_that_runs_metrics(tmp_path, tiny):
    """As on Kaggle, where the next version resumes from the attached earlier version's output folder."""
    config = straight_run(tmp_path, tiny)
    earlier = tmp_path / "earlier"
    shutil.copytree(tmp_path / "straight", earlier)
    run(replace_train(config, resume=str(earlier / "checkpoints" / "ckpt_00000010.pt")), tmp_path / "next")
    assert metrics_without_timing(tmp_path / "next") == metrics_without_timing(tmp_path / "straight")


def test_an_old_checkpoint_holding_its_metrics_history_still_resumes_with_it(tmp_path, tiny):
    config = straight_run(tmp_path, tiny)
    old = copy_stopped_at_10(tmp_path, "old")
    path = old / "checkpoints" / "ckpt_00000010.pt"
    history = [json.loads(line) for line in (old / "metrics.jsonl").read_text().splitlines()]
    payload = torch.load(path, weights_only=True)
    buffer = io.BytesIO()
    torch.save({**payload, "format": 2, "metrics": [r for r in history if r["step"] <= 10]}, buffer)  # format 2
    path.write_bytes(buffer.getvalue())
    checkpoint_module.checksum_path(path).write_text(hashlib.sha256(buffer.getvalue()).hexdigest())
    (old / "metrics.jsonl").unlink()  # so the history can only come from the checkpoint
    run(config, old)
    assert metrics_without_timing(old) == metrics_without_timing(tmp_path / "straight")


def replace_train(config, **changes):
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **changes))


def test_outputs_get_the_users_permissions_not_owner_only(tmp_path, tiny):
    run(tiny(train__max_steps=5), tmp_path)
    for path in (tmp_path / "summary.json", tmp_path / "metrics.jsonl", list_checkpoints(tmp_path / "checkpoints")[-1]):
        assert path.stat().st_mode & 0o777 == FILE_MODE, path
