"""## 24. Main

One call runs everything: check the environment, resolve the config, prepare the data, plan the model's
shape (with `model.size`), train (resuming when a checkpoint is there; with several GPUs, in one process per
GPU), then write `summary.json`, the curves, the `transformers` export and the samples. The notebook's run
cell calls `main(...)` with the parameters cell's values; from a shell, `python -m kernel` parses the same
settings from the command line (see the README).
"""

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl  # POSIX: the output folder's lock
except ImportError:
    fcntl = None

import torch

from kernel.env import (ADAPTER_DIR, CHECKPOINTS_DIR, CONFIG_FILE, CURVES_FILE, EXPORT_DIR, KAGGLE_TIME_BUDGET_S,
                        SAMPLES_FILE, SUMMARY_FILE, TOKENIZER_DIR, KernelError, default_out_dir, describe_environment, dtype_name,
                        is_kaggle, json_safe, print_environment, resolve_dtype, seed_everything, write_atomic,
                        write_json_atomic)
from kernel.config import Config, SampleConfig, config_from_dict, config_to_yaml, load_config, parse_overrides
from kernel.tokenization import Tokenizer, tokenizer_from_dict
from kernel.data import TokenData, cache_location, prepare_data, print_data_report
from kernel.hf_interop import apply_pretrained, fit_vocabulary
from kernel.lora import count_parameters, write_peft_adapter
from kernel.distributed import (Processes, from_main, join_process_group, launch_torchrun, leave_process_group,
                                only_main_prints, processes_to_launch, program_source, run_started_at,
                                split_global_batch, wait_for_all)
from kernel.checkpoint import (Checkpoint, check_resume_compatible, find_resume_checkpoint, load_checkpoint,
                               earlier_sessions, remove_output_debris, run_folder)
from kernel.optim import optimizer_line
from kernel.memory import fit_to_memory
from kernel.progress import RESERVE_FLOOR_S, RunStopped, StopRequests
from kernel.train import TrainResult, train
from kernel.plan import plan_model, planned, planned_before
from kernel.sample import EvalSamples, format_samples, run_sampling, sample_texts, short_samples
from kernel.export import export_hf, run_facts
from kernel.report import LossCurves, human_summary, in_notebook, run_label

GPU_CONFIG, CPU_CONFIG = "llm_kaggle_t4.yaml", "llm_cpu.yaml"


def pick_config(name: str) -> str:
    """'auto' means the T4 preset when a CUDA GPU is visible, the CPU demo preset otherwise."""
    if name == "auto":
        return GPU_CONFIG if torch.cuda.is_available() else CPU_CONFIG
    return name


def resolve_config(name: str, overrides=None, overrides_origin: str = "--set") -> Config:
    """A preset name or YAML path ('auto': by the hardware) with overrides, and model.init_from's folder applied."""
    return load_config(pick_config(name), overrides, overrides_origin, pretrained=apply_pretrained)


def ensure_writable(folder: Path) -> None:
    """Fail before any work when the output folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise KernelError(f"the output folder {folder} cannot be written ({type(err).__name__}: "
                          f"{err.strerror or err}); choose another one with --out (or OUT_DIR in the notebook)") from None


# --- Before training: the output folder, the checkpoint, the data, the plan ----------------------------

def run(config: Config, out_dir: str | Path, now=time.perf_counter) -> dict | None:
    """Train with a resolved config, write every output into out_dir, return the summary. Under torchrun every
    process calls it; rank 0 returns the summary, the others None. `now`: the clock of the time budget."""
    processes, device = join_process_group(config.train.device)
    try:
        with only_main_prints(processes):
            return run_process(config, Path(out_dir), processes, device, now)
    finally:
        leave_process_group()


def prepare_data_once(config: Config, cache_root: Path, tokenizer: Tokenizer | None, processes: Processes,
                      private: bool):
    """Rank 0 builds the token cache; then the first process of every other machine (which builds its own
    copy unless the folder is shared); then all the others read it. Never two builders on one folder."""
    turns = (processes.is_main, processes.local_rank == 0 and not processes.is_main, processes.local_rank != 0)
    for my_turn in turns:
        if my_turn:
            data = prepare_data(config, cache_root, tokenizer, private)
        wait_for_all(processes)
    return data


def agreed_resume_checkpoint(resume: str, out_dir: Path, processes: Processes) -> tuple[Path | None, Checkpoint | None]:
    """Rank 0 picks the checkpoint to resume from (or none); every process then loads that same file, so no
    process can start from another step (e.g. a machine whose output folder is not shared)."""
    found = find_resume_checkpoint(resume, out_dir) if processes.is_main else None
    path = from_main(processes, str(found[0]) if found else None)
    if path is None:
        return None, None
    if processes.is_main:
        return found
    if not Path(path).is_file():
        raise KernelError(f"process {processes.rank} cannot read {path}, the checkpoint rank 0 resumes from: give "
                          "every machine the same (shared) output folder, or set train.resume to a path all can read")
    return Path(path), load_checkpoint(path)


@contextlib.contextmanager
def output_lock(out_dir: Path, taken: bool = True):
    """One run per output folder: an advisory lock (flock) on `<out>/.lock`, which names the holder's PID. The
    operating system releases it when the process ends, even by kill -9, so a crash never leaves it stale."""
    if not taken or fcntl is None:  # other processes of this run, or Windows
        yield
        return
    with open(out_dir / ".lock", "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise KernelError(f"another run (PID {holder}) is using the output folder {out_dir}: wait for it to "
                              "end or stop it, or choose another output folder (--out, OUT_DIR in the notebook)"
                              ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        remove_output_debris(out_dir)
        yield


def time_budget(config: Config) -> float | None:
    budget = config.train.time_budget or (KAGGLE_TIME_BUDGET_S if is_kaggle() else None)
    if budget and not config.train.time_budget:
        print(f"[env] Kaggle: train.time_budget defaults to {budget / 3600:.0f}h, inside the session limit")
    if not budget and config.train.max_steps == "auto":
        raise KernelError("train.max_steps=auto trains for as long as train.time_budget allows, and no budget is "
                          "set: give one (e.g. train.time_budget=2h; on Kaggle it defaults to 8h) or a number of steps")
    return budget


@dataclass
class PreparedRun:
    data: TokenData
    dtype: torch.dtype
    checkpoint: Checkpoint | None
    resume_path: Path | None
    config: Config            # the run's config: with model.size, the planned shape
    plan: dict | None = None  # with model.size, what the plan measured and chose (summary.json "plan")


def prepare_run(config: Config, out_dir: Path, processes: Processes, device: torch.device,
                train_seconds: float | None = None, now=time.perf_counter) -> PreparedRun:
    """Everything before training: the checkpoint to resume from, the data, the model's size (`train_seconds`:
    what the budget leaves for training, for model.size=auto), the number format."""
    if config.train.dtype != "auto":  # a format this device cannot use (bf16 on a T4) fails before the data is read
        resolve_dtype(config.train.dtype, device, config.model.n_embd)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 on Ampere+ for the matmuls autocast leaves in fp32
    seed_everything(config.train.seed + processes.rank)  # the RNG drives dropout: a different mask per process
    resume_path, checkpoint = agreed_resume_checkpoint(config.train.resume, out_dir, processes)
    if checkpoint is not None and config.model.size:  # the shape (and learning rates) the run was planned with
        config = planned_before(config, config_from_dict(checkpoint.config, "the checkpoint's config"))
    if checkpoint is not None:
        check_resume_compatible(checkpoint, config, resume_path)
    given_tokenizer = tokenizer_from_dict(checkpoint.tokenizer) if checkpoint else None
    cache_root, private = cache_location(config.data.cache_dir, out_dir)
    data = prepare_data_once(config, cache_root, given_tokenizer, processes, private=private)
    print_data_report(data)
    config = fit_vocabulary(config, data.tokenizer.vocab_size)
    plan = None
    if config.model.size and checkpoint is None:
        config, plan = planned_config(config, data, processes, device, train_seconds, now)
    dtype, why = resolve_dtype(config.train.dtype, device, config.model.n_embd, checkpoint and checkpoint.dtype)
    print(f"[env] device {device} | dtype {dtype_name(dtype)} ({why})")
    if config.train.optimizer == "muon":
        print(f"[env] {optimizer_line(config.train, device)}")
    config = memory_planned(config, data.tokenizer.vocab_size, device, dtype, processes)
    if processes.is_main:  # (tokenizer/ is written after training: saving it imports transformers, seconds)
        write_atomic(out_dir / CONFIG_FILE, config_to_yaml(config))
    return PreparedRun(data, dtype, checkpoint, resume_path, config, plan)


def memory_planned(config: Config, vocab_size: int, device: torch.device, dtype: torch.dtype,
                   processes: Processes) -> Config:
    """The micro-batch and gradient checkpointing that fit (section 16), rank 0's choice for every process (their
    GPUs' free memory may differ a little, and all must take the same pieces)."""
    fitted = fit_to_memory(config, vocab_size, device, dtype, processes.world_size) if processes.is_main else None
    t, m = from_main(processes, (fitted.train, fitted.model) if fitted else None)
    return dataclasses.replace(config, train=t, model=m)


def planned_config(config: Config, data: TokenData, processes: Processes, device: torch.device,
                   train_seconds: float | None, now) -> tuple[Config, dict]:
    """model.size: rank 0 plans (measuring on its device), every process takes its choice."""
    chosen = None
    if processes.is_main:
        plan = plan_model(config, data.tokenizer.vocab_size, int(data.train.size), train_seconds, device,
                          processes.world_size, now)
        print(plan.report())
        chosen = (plan.chosen.n_layer, plan.chosen.n_embd, plan.steps, plan.to_dict())
    n_layer, n_embd, steps, summary = from_main(processes, chosen)
    return planned(config, n_layer, n_embd, steps), summary


# --- Training, then the outputs ------------------------------------------------------------------------

def run_process(config: Config, out_dir: Path, processes: Processes, device: torch.device,
                now=time.perf_counter) -> dict | None:
    started = now() - max(0.0, time.time() - run_started_at())  # in a launched process: the launcher's start
    budget = time_budget(config)
    if budget and started + budget - now() <= RESERVE_FLOOR_S:  # refused before any data is read
        raise KernelError(f"train.time_budget={budget:g}s is spent before the run can start ({now() - started:.1f}s "
                          f"have passed, and {RESERVE_FLOOR_S:g}s at least are kept to evaluate and save at the "
                          "end): give a longer budget, e.g. train.time_budget=5m")
    environment = describe_environment()
    print_environment(environment)
    if processes.is_main:
        ensure_writable(out_dir)
    with StopRequests() as stops, output_lock(out_dir, processes.is_main):
        try:
            prepared = prepare_run(config, out_dir, processes, device,
                                   train_seconds=started + budget - now() if budget else None, now=now)
        except RunStopped as stop:
            raise RunStopped(stop.signal_name, f"stopped by {stop.signal_name} while preparing the run (before "
                             "any training): nothing was trained and no checkpoint was changed") from None
        config = prepared.config  # model.size: the planned shape
        curves = LossCurves(out_dir / CURVES_FILE, run_label(out_dir, config),  # in a notebook: redrawn at each eval
                            sessions=earlier_sessions(prepared.checkpoint) if prepared.checkpoint else [])
        sampling = run_sampling(config.sample, prepared.data)  # (settings, as a chat)
        eval_samples = start_eval_samples(config, out_dir, prepared, device, processes, sampling)
        result = train(config, prepared.data, out_dir, device, prepared.dtype, prepared.checkpoint,
                       prepared.resume_path, deadline=started + budget if budget else None, processes=processes,
                       now=now, stop_requests=stops, run_started=started, on_eval=curves.update,
                       sample_at_eval=eval_samples)
        if not processes.is_main:
            return None
        with stops.while_writing(interrupted_by=math.inf):  # quick, and what the run paid for: never interrupted
            if result.step or result.stopped_by != "max_steps":
                print(f"[train] {result.step:,} steps, {result.tokens:,} tokens, {result.tokens_per_s:,.0f} "
                      f"tokens/s, {result.wall_s:.1f}s, params {result.model.num_params():,} "
                      f"({count_parameters(result.model)[0]:,} trained)")
            summary = run_summary(result, prepared, device, processes, environment, out_dir)
            write_json_atomic(out_dir / SUMMARY_FILE, summary)  # first: what the run paid for is never lost
            finish_outputs(config, out_dir, prepared.data.tokenizer, result, device, stops, curves, summary,
                           eval_samples, sampling)
            stops.finish()  # everything is written: a stop signal now would only turn success into exit code 143
            print(f"[done] val loss {summary['val_loss']:.4f} | ppl {summary['val_ppl']:.2f} | "
                  f"bpb {summary['val_bpb']:.3f} | outputs in {out_dir}")
            print(human_summary(summary))
        return json_safe(summary)


def start_eval_samples(config: Config, out_dir: Path, prepared: PreparedRun, device: torch.device,
                       processes: Processes, sampling: tuple[SampleConfig, bool]) -> EvalSamples | None:
    """Rank 0's samples at evaluations, continuing those of the checkpoint's run when resuming."""
    if not processes.is_main:
        return None
    settings, chat = sampling
    samples = EvalSamples(out_dir / SAMPLES_FILE, prepared.data.tokenizer, settings, device, config.train.seed, chat)
    resumed = prepared.checkpoint is not None
    samples.start(run_folder(prepared.resume_path) if resumed else None, prepared.checkpoint.step if resumed else 0)
    return samples


def run_summary(result: TrainResult, prepared: PreparedRun, device: torch.device, processes: Processes,
                environment: dict, out_dir: Path) -> dict:
    return {
        "val_loss": result.last_eval["val_loss"], "val_ppl": result.last_eval["val_ppl"],
        "val_bpb": result.last_eval["val_bpb"], "train_loss": result.train_loss,
        "tokens_per_s": result.tokens_per_s, "mfu": result.mfu, "flops_per_token": result.model.flops_per_token(),
        "steps": result.step, "tokens": result.tokens, "train_seconds": result.train_seconds,
        "sessions": result.sessions,  # one per session (notebook version): the totals above cover them all
        "wall_s": result.wall_s, "setup_s": result.setup_s, "params": result.model.num_params(),
        "params_trainable": count_parameters(result.model)[0], "device": str(device),
        "processes": processes.world_size,
        "dtype": dtype_name(prepared.dtype), "stopped_by": result.stopped_by, "resumed_from": result.resumed_from,
        "best_checkpoint": result.best, "plan": prepared.plan,
        "data": prepared.data.stats, "environment": environment, "out_dir": str(out_dir),
    }


def finish_outputs(config: Config, out_dir: Path, tokenizer: Tokenizer, result: TrainResult, device: torch.device,
                   stops: StopRequests, curves: LossCurves, summary: dict, eval_samples: EvalSamples | None,
                   sampling: tuple[SampleConfig, bool]) -> None:
    """The tokenizer's folder, the curves, the transformers export and the samples. Each is a convenience made
    from the checkpoint already saved (which holds the tokenizer too): a failure skips it with a line, never the
    run's results. After a stop (a signal that ended training or comes now) they are still written, the samples
    short; a second stop skips what is left."""
    def write_samples() -> None:
        samples = final_samples_unless_stopped(result.model, tokenizer, config, device, stops, sampling)
        during = eval_samples.text() if eval_samples is not None else ""  # samples.txt: these, then the final ones
        write_atomic(out_dir / SAMPLES_FILE, during + format_samples(samples))
        print(format_samples(samples))

    outputs = [(f"{TOKENIZER_DIR}/", f"python -m kernel export {out_dir / CHECKPOINTS_DIR} DIR",  # for AutoTokenizer
                lambda: tokenizer.save(out_dir / TOKENIZER_DIR)),
               (CURVES_FILE, "", lambda: curves.finish(result.history, result.sessions)),  # shown in a notebook
               ("the hf/ export", f"python -m kernel export {out_dir / CHECKPOINTS_DIR} DIR",
                # the run's own folder: its earlier export is replaced, a file a user put there is kept
                lambda: export_hf(result.model, tokenizer, config, out_dir / EXPORT_DIR, run_facts(summary), force=True)),
               (SAMPLES_FILE, f"python -m kernel sample {out_dir / CHECKPOINTS_DIR}", write_samples)]
    if config.train.lora_rank:  # the adapters alone, for PEFT, beside the merged model
        outputs.insert(2, (f"the {ADAPTER_DIR}/ adapters", "",
                           lambda: write_peft_adapter(result.model, config, out_dir / ADAPTER_DIR)))
    for name, retry, make in outputs:
        if stops.stops() >= 2:
            print(f"[stop] {name} skipped after a second stop signal")
            continue
        try:
            with stops.while_writing(interrupted_by=2):
                make()
        except RunStopped as stop:
            print(f"[stop] {name} skipped after a second stop signal ({stop.signal_name}); the checkpoint and "
                  "summary.json are saved")
        except KernelError as err:  # a known problem: its message says what to change
            print(f"[warn] could not write {name}: {err}; the checkpoint and summary.json are saved")
        except Exception as err:  # noqa: BLE001 - a broken extra must not cost the trained model
            print(f"[warn] could not write {name} ({type(err).__name__}: {err}); the checkpoint and summary.json "
                  f"are saved{f': try {retry!r}' if retry else ''}")


def final_samples_unless_stopped(model, tokenizer: Tokenizer, config: Config, device: torch.device,
                                 stops: StopRequests, sampling: tuple[SampleConfig, bool]) -> list[tuple[str, str]]:
    """The final samples as `sampling` says (run_sampling: a chat run answers questions); after a stop (or when
    one cuts them short) one short sample per prompt (`short_samples`), so a stopped run still ends within a
    bounded time with some text."""
    settings, chat = sampling
    if not stops.stops():
        try:
            with stops.while_writing(interrupted_by=1):
                return sample_texts(model, tokenizer, settings, device, config.train.seed, chat)
        except RunStopped as stop:
            print(f"[stop] the final samples cut short after {stop.signal_name}")
    return sample_texts(model, tokenizer, short_samples(settings), device, config.train.seed, chat)


def show_in_notebook(png: Path) -> None:
    """Display the curves inline when running in a notebook (the file is written either way)."""
    if in_notebook() and png.is_file():
        from IPython.display import Image, display
        display(Image(filename=str(png)))


# --- The entry point: main() ---------------------------------------------------------------------------

def main(config: str = "auto", overrides: dict | list | None = None, data_glob: str = "",
         out_dir: str = "") -> dict:
    """The notebook's entry point: the parameters cell's values in, the run's summary out."""
    settings = parse_overrides(overrides, "parameters cell")
    if data_glob:
        settings["data.text_glob"] = data_glob
    resolved = resolve_config(config, settings, "parameters cell")
    out_dir = str(out_dir or default_out_dir())
    return run_or_launch(resolved, out_dir, dict(config=config, overrides=overrides, data_glob=data_glob, out_dir=out_dir))


def run_or_launch(config: Config, out_dir: str, call: dict) -> dict:
    """Train here, or with several GPUs (train.devices) start one process per GPU with torchrun, each making
    `call` (main's arguments) again; then return the summary rank 0 wrote."""
    count = processes_to_launch(config.train.devices, config.train.device)
    if count == 1:
        return run(config, out_dir)
    split_global_batch(config.train.batch_size, config.train.grad_accum_steps, count)  # fail before launching
    started_at = time.time()
    ensure_writable(Path(out_dir))
    package = __name__.rpartition(".")[0] or None  # "kernel" when imported; in a notebook, its own cells
    summary_path = Path(out_dir) / SUMMARY_FILE
    launch_torchrun(program_source({**call, "processes": count}, globals(), package), count, Path(out_dir), started_at)
    if not summary_path.is_file() or summary_path.stat().st_mtime < started_at:  # none, or an earlier run's
        raise KernelError(f"the training processes stopped before writing {summary_path}; run again to resume "
                          f"from the newest checkpoint in {Path(out_dir) / CHECKPOINTS_DIR}")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    show_in_notebook(Path(out_dir) / CURVES_FILE)
    return summary


