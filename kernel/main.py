"""## 14. Main

One call runs everything: check the environment, resolve the config, prepare the data, train (resuming
when a checkpoint is there), write samples and `summary.json`. The notebook's last cell calls `main(...)`
with the parameters cell's values; `python -m kernel` calls `cli()`, which parses the same settings from
the command line:

    python -m kernel --config configs/llm_cpu.yaml --set train.max_steps=500 --out outputs
    python -m kernel sample outputs/checkpoints/ckpt_00002000.pt --prompt "def "
    python -m kernel export outputs/checkpoints/ckpt_00002000.pt exported/
    python -m kernel check-env
"""

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

try:
    import fcntl  # POSIX: the output folder's lock
except ImportError:
    fcntl = None

import torch

from kernel.env import (DTYPES, KAGGLE_TIME_BUDGET_S, KernelError, default_out_dir, describe_environment, dtype_name,
                        is_kaggle, print_environment, resolve_device, resolve_dtype, seed_everything, write_atomic)
from kernel.config import (DEVICE_PATTERN, Config, SampleConfig, config_from_dict, config_to_yaml, did_you_mean,
                           load_config, parse_overrides)
from kernel.tokenization import Tokenizer, tokenizer_from_dict
from kernel.data import TokenData, cache_location, prepare_data, print_data_report
from kernel.model import GPT
from kernel.distributed import (Processes, from_main, join_process_group, launch_torchrun, leave_process_group,
                                only_main_prints, processes_to_launch, program_source, run_started_at,
                                split_global_batch, wait_for_all)
from kernel.checkpoint import (CHECKPOINT_PATTERN, Checkpoint, CheckpointError, check_resume_compatible, checksum_path,
                               find_resume_checkpoint, list_checkpoints, load_checkpoint, remove_output_debris)
from kernel.train import (RunStopped, StopRequests, TrainResult, build_model, optimizer_blocker, require_optimizer,
                          train)
from kernel.plan import plan_model, shaped
from kernel.sample import format_samples, sample_texts, sampling_settings
from kernel.export import RunFacts, export_hf
from kernel.report import LossCurves, human_summary, in_notebook, run_label

GPU_CONFIG, CPU_CONFIG = "llm_kaggle_t4.yaml", "llm_cpu.yaml"


def pick_config(name: str) -> str:
    """'auto' means the T4 preset when a CUDA GPU is visible, the CPU demo preset otherwise."""
    if name == "auto":
        return GPU_CONFIG if torch.cuda.is_available() else CPU_CONFIG
    return name


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")


def json_safe(value):
    """NaN and infinities as null: JSON has no such numbers (Python would write the invalid `NaN`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def ensure_writable(folder: Path) -> None:
    """Fail before any work when the output folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise KernelError(f"the output folder {folder} cannot be written ({type(err).__name__}: "
                          f"{err.strerror or err}); choose another one with --out (or OUT_DIR in the notebook)") from None


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
    require_optimizer(config.train)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 on Ampere+ for the matmuls autocast leaves in fp32
    seed_everything(config.train.seed + processes.rank)  # the RNG drives dropout: a different mask per process
    resume_path, checkpoint = agreed_resume_checkpoint(config.train.resume, out_dir, processes)
    if checkpoint is not None and config.model.size:  # the shape (and learning rates) the run was planned with
        config = planned_before(config, checkpoint)
    if checkpoint is not None:
        check_resume_compatible(checkpoint, config, resume_path)
    given_tokenizer = tokenizer_from_dict(checkpoint.tokenizer) if checkpoint else None
    cache_root, private = cache_location(config.data.cache_dir, out_dir)
    data = prepare_data_once(config, cache_root, given_tokenizer, processes, private=private)
    print_data_report(data)
    plan = None
    if config.model.size and checkpoint is None:
        config, plan = planned_config(config, data, processes, device, train_seconds, now)
    dtype, why = resolve_dtype(config.train.dtype, device, config.model.n_embd)
    if config.train.dtype == "auto" and checkpoint is not None:  # keep the precision the run started with
        dtype, why = DTYPES[checkpoint.dtype], "as when the checkpoint was written"
    print(f"[env] device {device} | dtype {dtype_name(dtype)} ({why})")
    if processes.is_main:
        write_atomic(out_dir / "config.yaml", config_to_yaml(config))
        data.tokenizer.save(out_dir / "tokenizer")
    return PreparedRun(data, dtype, checkpoint, resume_path, config, plan)


def planned_config(config: Config, data: TokenData, processes: Processes, device: torch.device,
                   train_seconds: float | None, now) -> tuple[Config, dict]:
    """model.size: rank 0 plans (measuring on its device), every process takes its choice."""
    chosen = None
    if processes.is_main:
        plan = plan_model(config, data.tokenizer.vocab_size, int(data.train.size), train_seconds, device,
                          resolve_dtype(config.train.dtype, device, config.model.n_embd)[0], processes.world_size, now)
        print(plan.report())
        chosen = (plan.chosen.n_layer, plan.chosen.n_embd, plan.to_dict())
    n_layer, n_embd, summary = from_main(processes, chosen)
    return shaped(config, n_layer, n_embd), summary


def planned_before(config: Config, checkpoint: Checkpoint) -> Config:
    saved = config_from_dict(checkpoint.config, "the checkpoint's config")
    print(f"[plan] resumed: the shape planned at the start, {saved.model.n_layer} x {saved.model.n_embd}")
    return dataclasses.replace(config, model=saved.model, train=dataclasses.replace(
        config.train, lr=saved.train.lr, min_lr=saved.train.min_lr))


def run_process(config: Config, out_dir: Path, processes: Processes, device: torch.device,
                now=time.perf_counter) -> dict | None:
    started = now() - max(0.0, time.time() - run_started_at())  # in a launched process: the launcher's start
    budget = time_budget(config)
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
        curves = LossCurves(out_dir / "loss.png", run_label(out_dir, config))  # in a notebook: redrawn at each eval
        result = train(config, prepared.data, out_dir, device, prepared.dtype, prepared.checkpoint,
                       prepared.resume_path, deadline=started + budget if budget else None, processes=processes,
                       now=now, stop_requests=stops, run_started=started, on_eval=curves.update)
        if not processes.is_main:
            return None
        print(f"[train] {result.step:,} steps, {result.tokens:,} tokens, {result.tokens_per_s:,.0f} tokens/s, "
              f"{result.wall_s:.1f}s, params {result.model.num_params():,}")
        summary = run_summary(result, prepared, device, processes, environment, out_dir)
        write_json_atomic(out_dir / "summary.json", summary)  # first: what the run paid for is never lost
        finish_outputs(config, out_dir, prepared.data.tokenizer, result, device, stops, curves, summary)
        print(f"[done] val loss {summary['val_loss']:.4f} | ppl {summary['val_ppl']:.2f} | "
              f"bpb {summary['val_bpb']:.3f} | outputs in {out_dir}")
        print(human_summary(summary))
        return json_safe(summary)


def run_summary(result: TrainResult, prepared: PreparedRun, device: torch.device, processes: Processes,
                environment: dict, out_dir: Path) -> dict:
    return {
        "val_loss": result.last_eval["val_loss"], "val_ppl": result.last_eval["val_ppl"],
        "val_bpb": result.last_eval["val_bpb"], "train_loss": result.train_loss,
        "tokens_per_s": result.tokens_per_s, "mfu": result.mfu, "flops_per_token": result.model.flops_per_token(),
        "steps": result.step, "tokens": result.tokens,
        "wall_s": result.wall_s, "params": result.model.num_params(), "device": str(device),
        "processes": processes.world_size,
        "dtype": dtype_name(prepared.dtype), "stopped_by": result.stopped_by, "resumed_from": result.resumed_from,
        "best_checkpoint": result.best, "plan": prepared.plan,
        "data": prepared.data.stats, "environment": environment, "out_dir": str(out_dir),
    }


def finish_outputs(config: Config, out_dir: Path, tokenizer: Tokenizer, result: TrainResult, device: torch.device,
                   stops: StopRequests, curves: LossCurves, summary: dict) -> None:
    """The curves, the transformers export and the samples. Each is a convenience made from the checkpoint
    already saved: a failure or a stop signal skips it with a line, never the run's results."""
    def write_samples() -> None:
        samples = sample_texts(result.model, tokenizer, config.sample, device, config.train.seed)
        write_atomic(out_dir / "samples.txt", format_samples(samples))
        print(format_samples(samples))

    outputs = [("loss.png", "", lambda: curves.finish(result.history)),  # shown in a notebook
               ("the hf/ export", f"python -m kernel export {out_dir / 'checkpoints'} DIR",
                # the run's own folder: its earlier export is replaced, a file a user put there is kept
                lambda: export_hf(result.model, tokenizer, config, out_dir / "hf", run_facts(summary), force=True)),
               ("samples.txt", f"python -m kernel sample {out_dir / 'checkpoints'}", write_samples)]
    for name, retry, make in outputs:
        if stops.signal_name:
            print(f"[stop] {name} skipped after {stops.signal_name}")
            continue
        try:
            make()
        except RunStopped as stop:
            print(f"[stop] {name} skipped after {stop.signal_name}; the checkpoint and summary.json are saved")
        except KernelError as err:  # a known problem: its message says what to change
            print(f"[warn] could not write {name}: {err}; the checkpoint and summary.json are saved")
        except Exception as err:  # noqa: BLE001 - a broken extra must not cost the trained model
            print(f"[warn] could not write {name} ({type(err).__name__}: {err}); the checkpoint and summary.json "
                  f"are saved{f': try {retry!r}' if retry else ''}")


def run_facts(summary: dict) -> RunFacts:
    """What the model card tells about the run, from its summary."""
    return RunFacts(name=Path(summary["out_dir"]).name, steps=summary["steps"], tokens=summary["tokens"],
                    evaluation={k: summary[k] for k in ("val_loss", "val_ppl", "val_bpb")}, data=summary["data"],
                    trained_on=f"{summary['device']}, {summary['dtype']}, {summary['processes']} process(es), "
                               f"{summary['wall_s']:.0f} s of training")


def show_in_notebook(png: Path) -> None:
    """Display the curves inline when running in a notebook (the file is written either way)."""
    if in_notebook() and png.is_file():
        from IPython.display import Image, display
        display(Image(filename=str(png)))


def main(config: str = "auto", overrides: dict | list | None = None, data_glob: str = "",
         out_dir: str = "") -> dict:
    """The notebook's entry point: the parameters cell's values in, the run's summary out."""
    settings = parse_overrides(overrides, "parameters cell")
    if data_glob:
        settings["data.text_glob"] = data_glob
    resolved = load_config(pick_config(config), settings, overrides_origin="parameters cell")
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
    summary_path = Path(out_dir) / "summary.json"
    launch_torchrun(program_source({**call, "processes": count}, globals(), package), count, Path(out_dir), started_at)
    if not summary_path.is_file() or summary_path.stat().st_mtime < started_at:  # none, or an earlier run's
        raise KernelError(f"the training processes stopped before writing {summary_path}; run again to resume "
                          f"from the newest checkpoint in {Path(out_dir) / 'checkpoints'}")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    show_in_notebook(Path(out_dir) / "loss.png")
    return summary


# --- The command line ----------------------------------------------------------------------------------

COMMAND_HELP = {
    "sample": "text from a run folder or a checkpoint, e.g. python -m kernel sample outputs --prompt 'The '",
    "export": "a checkpoint as a transformers model folder with a model card: python -m kernel export outputs my-model",
    "check-env": "versions, devices, the precision a run with this config would train in, and its optimizer",
}
SAMPLING_KEYS = [f.name for f in fields(SampleConfig) if f.name != "prompts"]


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def checkpoint_to_use(path: str | Path) -> tuple[Path, Checkpoint]:
    """A checkpoint file, or the newest valid one of a run folder (in it or in its checkpoints/)."""
    given = Path(path).expanduser()
    if given.is_dir():
        found = list_checkpoints(given) or list_checkpoints(given / "checkpoints")
        if not found:
            raise KernelError(f"{given} holds no checkpoint ({CHECKPOINT_PATTERN}, in it or in its checkpoints/ "
                              "folder): give a run's output folder or a checkpoint file")
        return newest_loadable(found)
    if not given.is_file():
        raise KernelError(f"{path} is neither a checkpoint file nor a run folder")
    return given, load_copied(given)


def newest_loadable(found: list[Path]) -> tuple[Path, Checkpoint]:
    """The newest checkpoint whose checksum matches (in a run folder, a missing checksum means an interrupted
    write); when none has a checksum file (files copied by hand), the newest one."""
    problems = []
    for candidate in reversed(found):
        if checksum_path(candidate).is_file():
            try:
                return candidate, load_checkpoint(candidate)
            except CheckpointError as err:
                problems.append(str(err))
                warn(f"{err}; trying the one before it")
    if problems:
        raise KernelError("no usable checkpoint: " + "; ".join(problems))
    return found[-1], load_copied(found[-1])


def load_copied(path: Path) -> Checkpoint:
    """A checkpoint without its .sha256 loads with a warning: the checksum tells complete writes in the output
    folder from interrupted ones, and a file copied alone (e.g. from Kaggle's Output tab) has none."""
    if checksum_path(path).is_file():
        return load_checkpoint(path)
    warn(f"{path} has no checksum file {checksum_path(path).name} (copied alone?): loaded without verifying it")
    return load_checkpoint(path, require_checksum=False)


def load_trained(path: str | Path, checkpoint: Checkpoint | None = None) -> tuple[Config, Tokenizer, GPT]:
    """The config, tokenizer and model of a checkpoint (pass it when it is already loaded)."""
    checkpoint = checkpoint or load_checkpoint(path)
    config = config_from_dict(checkpoint.config, f"{path} (saved config)")
    tokenizer = tokenizer_from_dict(checkpoint.tokenizer)
    model = build_model(config, tokenizer.vocab_size)
    model.load_state_dict(checkpoint.model)
    return config, tokenizer, model


def sample_checkpoint(path: str | Path, changes: dict, seed: int | None, device: str, name) -> str:
    """Samples from a checkpoint or a run folder. `changes`: sample.* values to use instead of the
    checkpoint's (None keeps its own), checked before anything is loaded; a bad one is named by `name`."""
    sampling_settings(SampleConfig(), name, **changes)
    if not DEVICE_PATTERN.fullmatch(device):
        raise KernelError(f"{name('device')} must be auto, cpu, mps, cuda or cuda:N, got {device!r}")
    device = resolve_device(device)
    path, checkpoint = checkpoint_to_use(path)
    print(f"[sample] {path} (step {checkpoint.step:,})", file=sys.stderr)
    config, tokenizer, model = load_trained(path, checkpoint)
    settings = sampling_settings(config.sample, name, **changes)
    seed = config.train.seed if seed is None else seed  # the run's own samples.txt used train.seed too
    return format_samples(sample_texts(model.to(device), tokenizer, settings, device, seed))


def sample_command(args: argparse.Namespace) -> None:
    prompts = args.prompt + [read_prompt_file(path) for path in args.prompt_file]
    changes = {"prompts": prompts or None, **{key: getattr(args, key) for key in SAMPLING_KEYS}}
    print(sample_checkpoint(args.checkpoint, changes, args.seed, args.device, flag_name))


def read_prompt_file(path: str) -> str:
    """A prompt file's text as it is, but for one final line break (which editors add by themselves)."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise KernelError(f"--prompt-file {path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise KernelError(f"--prompt-file {path}: {err.strerror or err}") from None
    return text.removesuffix("\n").removesuffix("\r")


def sample_from_run(out_dir: str | Path, prompts: list[str] | str | None = None, *, max_new_tokens: int | None = None,
                    temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                    num_samples: int | None = None, seed: int | None = None, device: str = "auto") -> str:
    """Samples from the newest valid checkpoint of a run folder (the notebook's last cell). What is left None
    is the run's own: its sample.* settings (SampleConfig's defaults unless the run set them) and train.seed."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    changes = dict(prompts=list(prompts) if prompts is not None else None, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_k=top_k, top_p=top_p, num_samples=num_samples)
    return sample_checkpoint(out_dir, changes, seed, device, lambda key: key)


def export_command(args: argparse.Namespace) -> None:
    path, checkpoint = checkpoint_to_use(args.checkpoint)
    config, tokenizer, model = load_trained(path, checkpoint)
    folder = export_hf(model, tokenizer, config, args.out, checkpoint_facts(path, checkpoint), force=args.force)
    print(f"exported {path} (step {checkpoint.step:,}) to {folder}")


def checkpoint_facts(path: Path, checkpoint: Checkpoint) -> RunFacts:
    """What the model card tells about a checkpoint's run: all of its summary.json when that describes this
    very checkpoint (the run's last), else what the checkpoint holds."""
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8")) if run_dir else {}
    except (OSError, ValueError):
        summary = {}
    if summary.get("steps") == checkpoint.step and "data" in summary:
        return run_facts({**summary, "out_dir": str(run_dir)})
    return RunFacts(name=run_dir.name if run_dir else path.stem, steps=checkpoint.step, tokens=checkpoint.tokens,
                    evaluation=dict(checkpoint.last_eval))


def check_env_command(args: argparse.Namespace) -> None:
    config = load_config(pick_config(args.config), args.overrides)
    print_environment(describe_environment())
    requested = args.device or config.train.device
    devices = [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())] if requested == "auto" else []
    for device in devices or [resolve_device(requested)]:
        # the rule a run with this config follows (a resumed run keeps its checkpoint's precision)
        dtype, why = resolve_dtype(config.train.dtype, device, config.model.n_embd)
        print(f"[env] device {device} | dtype {dtype_name(dtype)} ({why})")
    count = processes_to_launch(config.train.devices, requested)
    print(f"[env] train.devices={config.train.devices} trains with {count} "
          f"process{'es (torchrun, one per GPU)' if count > 1 else ''}")
    print(f"[env] {optimizer_blocker(config.train) or f'train.optimizer={config.train.optimizer}: available'}")
    print(f"[env] outputs would go to {default_out_dir()}")


class CommandLineParser(argparse.ArgumentParser):
    """A bad argument is one line (`error: ...`, exit code 2), as every other bad input."""

    def error(self, message: str):
        raise KernelError(f"{message} (`{self.prog} --help` lists the options)")


def build_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:<10} {line}" for name, line in COMMAND_HELP.items())
    parser = CommandLineParser(
        prog="python -m kernel", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="python -m kernel [--config CONFIG] [--set SECTION.KEY=VALUE ...] [--out OUT]\n"
              "       python -m kernel {sample,export,check-env} ...",
        description="Train a small GPT on your own text (with no command), or use a trained one.",
        epilog=f"commands:\n{commands}\n\n`python -m kernel COMMAND --help` lists a command's options.")
    parser.add_argument("--config", default="auto", help="a YAML file or bundled preset name "
                        f"(auto: {GPU_CONFIG} with a GPU, {CPU_CONFIG} without)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set train.lr=3e-4")
    parser.add_argument("--out", default="", help=f"output folder (default: {default_out_dir()})")
    return parser


def sample_parser() -> argparse.ArgumentParser:
    """One flag per SampleConfig field, which gives its help; a flag left out keeps the checkpoint's value."""
    parser = CommandLineParser(prog="python -m kernel sample", description=f"Sample {COMMAND_HELP['sample']}.")
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                        help="a run's output folder (its newest valid checkpoint) or a ckpt_*.pt file")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); with neither "
                        "--prompt nor --prompt-file: the checkpoint's sample.prompts")
    parser.add_argument("--prompt-file", action="append", default=[], metavar="FILE",
                        help="a prompt read from a UTF-8 text file (repeatable), as it is but for its final line break")
    defaults = SampleConfig()
    for spec in fields(SampleConfig):
        if spec.name in SAMPLING_KEYS:
            default = getattr(defaults, spec.name)
            parser.add_argument(flag_name(spec.name), type=type(default), default=None,
                                metavar="N" if isinstance(default, int) else "X",
                                help=f"{spec.metadata['help']} (default: the checkpoint's sample.{spec.name}, "
                                     f"{default} unless its run set it)")
    parser.add_argument("--seed", type=int, default=None, help="default: the run's train.seed")
    parser.add_argument("--device", default="auto", help="auto (the first GPU, else the CPU), cpu, cuda, cuda:N, mps")
    return parser


def export_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="python -m kernel export", description=f"Export {COMMAND_HELP['export']}.")
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                        help="a run's output folder (its newest valid checkpoint) or a ckpt_*.pt file")
    parser.add_argument("out", metavar="DIR", help="a new or empty folder, or one that holds an earlier export")
    parser.add_argument("--force", action="store_true", help="write into a folder that holds other files too: "
                        "replace only the export's own files there and keep the others")
    return parser


def check_env_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="python -m kernel check-env", description=f"Report {COMMAND_HELP['check-env']}.")
    parser.add_argument("--config", default="auto", help="the config a run would use (as for training)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--device", default=None, help="default: the config's train.device")
    return parser


def cli(argv: list[str] | None = None) -> int:
    """`python -m kernel ...`: exit code 0 on success (a run stopped by a signal after it trained included),
    2 with a one-line explanation on bad input, 128 + the signal's number when stopped before training."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"sample": (sample_parser, sample_command), "export": (export_parser, export_command),
                "check-env": (check_env_parser, check_env_command)}
    try:
        if argv and argv[0] in commands:
            make_parser, command = commands[argv[0]]
            command(make_parser().parse_args(argv[1:]))
        elif argv and not argv[0].startswith("-"):
            raise KernelError(f"unknown command {argv[0]!r}{did_you_mean(argv[0], list(commands))} "
                              "(`python -m kernel --help` lists the commands; with none, it trains)")
        else:
            args = build_parser().parse_args(argv)
            out_dir = args.out or default_out_dir()
            run_or_launch(load_config(pick_config(args.config), args.overrides), out_dir,
                          dict(config=args.config, overrides=args.overrides, data_glob="", out_dir=out_dir))
    except RunStopped as stop:  # a stop signal before training: the usual exit code of a signalled program
        print(f"stopped: {stop}", file=sys.stderr)
        return 128 + signal.Signals[stop.signal_name].value
    except KernelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
