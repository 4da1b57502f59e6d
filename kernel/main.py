"""## 13. Main

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
import json
import tempfile
import time
from pathlib import Path

import torch

from kernel.env import (DTYPES, KAGGLE_TIME_BUDGET_S, KernelError, default_out_dir, describe_environment, dtype_name,
                        is_kaggle, print_environment, resolve_device, resolve_dtype, seed_everything, write_atomic)
from kernel.config import Config, SampleConfig, config_from_dict, config_to_yaml, load_config, parse_overrides
from kernel.tokenization import Tokenizer, tokenizer_from_dict
from kernel.data import prepare_data, print_data_report
from kernel.model import GPT
from kernel.distributed import (Processes, from_main, join_process_group, launch_torchrun, leave_process_group,
                                only_main_prints, processes_to_launch, program_source, run_started_at,
                                split_global_batch, wait_for_all)
from kernel.checkpoint import Checkpoint, check_resume_compatible, find_resume_checkpoint, load_checkpoint
from kernel.train import build_model, probe_cpu_dtype, train
from kernel.sample import format_samples, sample_texts
from kernel.export import export_hf
from kernel.report import human_summary, plot_losses

GPU_CONFIG, CPU_CONFIG = "llm_kaggle_t4.yaml", "llm_cpu.yaml"


def pick_config(name: str) -> str:
    """'auto' means the T4 preset when a CUDA GPU is visible, the CPU demo preset otherwise."""
    if name == "auto":
        return GPU_CONFIG if torch.cuda.is_available() else CPU_CONFIG
    return name


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def ensure_writable(folder: Path) -> None:
    """Fail before any work when the output folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise KernelError(f"the output folder {folder} cannot be written ({type(err).__name__}: "
                          f"{err.strerror or err}); choose another one with --out (or OUT_DIR in the notebook)") from None


def run(config: Config, out_dir: str | Path) -> dict | None:
    """Train with a resolved config, write every output into out_dir, return the summary. Under torchrun every
    process calls it; rank 0 returns the summary, the others None."""
    processes, device = join_process_group(config.train.device)
    try:
        with only_main_prints(processes):
            return run_process(config, Path(out_dir), processes, device)
    finally:
        leave_process_group()


def prepare_data_once(config: Config, cache_root: Path, tokenizer: Tokenizer | None, processes: Processes):
    """Rank 0 builds the token cache; then the first process of every other machine (which builds its own
    copy unless the folder is shared); then all the others read it. Never two builders on one folder."""
    turns = (processes.is_main, processes.local_rank == 0 and not processes.is_main, processes.local_rank != 0)
    for my_turn in turns:
        if my_turn:
            data = prepare_data(config, cache_root, tokenizer)
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


def run_process(config: Config, out_dir: Path, processes: Processes, device: torch.device) -> dict | None:
    # The budget counts from the start of the whole run: in a launched process, from the launcher's start.
    started = time.perf_counter() - max(0.0, time.time() - run_started_at())
    budget = config.train.time_budget or (KAGGLE_TIME_BUDGET_S if is_kaggle() else None)
    if budget and not config.train.time_budget:
        print(f"[env] Kaggle: train.time_budget defaults to {budget / 3600:.0f}h, inside the session limit")
    environment = describe_environment()
    print_environment(environment)
    dtype, why = resolve_dtype(config.train.dtype, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 on Ampere+ for the matmuls autocast leaves in fp32
    seed_everything(config.train.seed + processes.rank)  # the RNG drives dropout: a different mask per process
    if processes.is_main:
        ensure_writable(out_dir)

    resume_path, checkpoint = agreed_resume_checkpoint(config.train.resume, out_dir, processes)
    if checkpoint is not None:
        check_resume_compatible(checkpoint, config, resume_path)
    cache_root = Path(config.data.cache_dir or out_dir / "cache")
    given_tokenizer = tokenizer_from_dict(checkpoint.tokenizer) if checkpoint else None
    data = prepare_data_once(config, cache_root, given_tokenizer, processes)
    print_data_report(data)
    if config.train.dtype == "auto" and checkpoint is not None:  # keep the precision the run started with
        dtype, why = DTYPES[checkpoint.dtype], "as when the checkpoint was written"
    elif config.train.dtype == "auto" and device.type == "cpu":  # measured once, the same for every process
        dtype, why = from_main(processes, probe_cpu_dtype(config, data.tokenizer.vocab_size) if processes.is_main else None)
    print(f"[env] device {device} | dtype {dtype_name(dtype)} ({why})")

    if processes.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / "config.yaml", config_to_yaml(config))
        data.tokenizer.save(out_dir / "tokenizer")
    result = train(config, data, out_dir, device, dtype, checkpoint, resume_path,
                   deadline=started + budget if budget else None, processes=processes)
    if not processes.is_main:
        return None
    print(f"[train] {result.step:,} steps, {result.tokens:,} tokens, {result.tokens_per_s:,.0f} tokens/s, "
          f"{result.wall_s:.1f}s, params {result.model.num_params():,}")

    export_hf(result.model, data.tokenizer, config.sample, out_dir / "hf")
    samples = sample_texts(result.model, data.tokenizer, config.sample, device, config.train.seed)
    write_atomic(out_dir / "samples.txt", format_samples(samples))
    print(format_samples(samples))

    summary = {
        "val_loss": result.last_eval["val_loss"], "val_ppl": result.last_eval["val_ppl"],
        "val_bpb": result.last_eval["val_bpb"], "train_loss": result.train_loss,
        "tokens_per_s": result.tokens_per_s, "mfu": result.mfu, "flops_per_token": result.model.flops_per_token(),
        "steps": result.step, "tokens": result.tokens,
        "wall_s": result.wall_s, "params": result.model.num_params(), "device": str(device),
        "processes": processes.world_size,
        "dtype": dtype_name(dtype), "stopped_by": result.stopped_by, "resumed_from": result.resumed_from,
        "best_checkpoint": result.best,
        "data": data.stats, "environment": environment, "out_dir": str(out_dir),
    }
    write_json_atomic(out_dir / "summary.json", summary)
    plot_losses(result.history, out_dir / "loss.png")
    print(f"[done] val loss {summary['val_loss']:.4f} | ppl {summary['val_ppl']:.2f} | "
          f"bpb {summary['val_bpb']:.3f} | outputs in {out_dir}")
    print(human_summary(summary))
    show_in_notebook(out_dir / "loss.png")
    return summary


def show_in_notebook(png: Path) -> None:
    """Display the curves inline when running in a notebook (the file is written either way)."""
    import sys
    if "ipykernel" in sys.modules:
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

def sample_command(args: argparse.Namespace) -> None:
    config, tokenizer, model = load_trained(args.checkpoint)
    if args.prompt:
        config.sample.prompts = args.prompt
    config.sample.max_new_tokens = args.max_new_tokens
    config.sample.temperature = args.temperature
    config.sample.top_k = args.top_k
    config.sample.top_p = args.top_p
    device = resolve_device(args.device)
    model.to(device)
    print(format_samples(sample_texts(model, tokenizer, config.sample, device, args.seed)))


def load_trained(path: str, checkpoint: Checkpoint | None = None) -> tuple[Config, Tokenizer, GPT]:
    """The config, tokenizer and model of a checkpoint (pass it when it is already loaded)."""
    checkpoint = checkpoint or load_checkpoint(path)
    config = config_from_dict(checkpoint.config, f"{path} (saved config)")
    tokenizer = tokenizer_from_dict(checkpoint.tokenizer)
    model = build_model(config, tokenizer.vocab_size)
    model.load_state_dict(checkpoint.model)
    return config, tokenizer, model


def sample_from_run(out_dir: str | Path, prompts: list[str], max_new_tokens: int = 200, temperature: float = 0.8,
                    top_k: int = 200, top_p: float = 1.0, seed: int = 0) -> str:
    """Samples from the newest valid checkpoint of a run (the notebook's last cell)."""
    found = find_resume_checkpoint("auto", Path(out_dir))
    if found is None:
        raise KernelError(f"no checkpoint in {Path(out_dir) / 'checkpoints'}: train first")
    config, tokenizer, model = load_trained(str(found[0]), found[1])  # already read and verified
    device = resolve_device("auto")
    settings = SampleConfig(prompts=list(prompts), max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p)
    return format_samples(sample_texts(model.to(device), tokenizer, settings, device, seed))


def export_command(args: argparse.Namespace) -> None:
    config, tokenizer, model = load_trained(args.checkpoint)
    print(f"exported to {export_hf(model, tokenizer, config.sample, args.out)}")


def check_env_command(args: argparse.Namespace) -> None:
    print_environment(describe_environment())
    devices = [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())] or [resolve_device(args.device)]
    for device in devices:
        dtype, why = resolve_dtype("auto", device)
        print(f"[env] device {device} | dtype {dtype_name(dtype)} ({why})")
    count = processes_to_launch("auto", args.device)
    print(f"[env] train.devices=auto trains with {count} process{'es (torchrun, one per GPU)' if count > 1 else ''}")
    print(f"[env] outputs would go to {default_out_dir()}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kernel", description="Train a small GPT on your own text.")
    parser.add_argument("--config", default="auto", help="a YAML file or bundled preset name "
                        f"(auto: {GPU_CONFIG} with a GPU, {CPU_CONFIG} without)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set train.lr=3e-4")
    parser.add_argument("--out", default="", help=f"output folder (default: {default_out_dir()})")
    return parser


def build_command_parsers() -> dict[str, argparse.ArgumentParser]:
    sample = argparse.ArgumentParser(prog="python -m kernel sample", description="Sample from a checkpoint.")
    sample.add_argument("checkpoint")
    sample.add_argument("--prompt", action="append", default=[], help="repeatable; default: the config's")
    sample.add_argument("--max-new-tokens", type=int, default=300)
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--top-k", type=int, default=200)
    sample.add_argument("--top-p", type=float, default=1.0)
    sample.add_argument("--seed", type=int, default=1337)
    sample.add_argument("--device", default="auto")
    check_env = argparse.ArgumentParser(prog="python -m kernel check-env", description="Report the environment.")
    check_env.add_argument("--device", default="auto")
    export = argparse.ArgumentParser(prog="python -m kernel export",
                                     description="Write a checkpoint as a transformers model folder.")
    export.add_argument("checkpoint")
    export.add_argument("out")
    return {"sample": sample, "check-env": check_env, "export": export}


def cli(argv: list[str] | None = None) -> int:
    """`python -m kernel ...`: exit code 0 on success, 2 with a one-line explanation on bad input."""
    import sys
    argv = sys.argv[1:] if argv is None else argv
    commands = {"sample": sample_command, "check-env": check_env_command, "export": export_command}
    try:
        if argv and argv[0] in commands:
            commands[argv[0]](build_command_parsers()[argv[0]].parse_args(argv[1:]))
        else:
            args = build_parser().parse_args(argv)
            out_dir = args.out or default_out_dir()
            run_or_launch(load_config(pick_config(args.config), args.overrides), out_dir,
                          dict(config=args.config, overrides=args.overrides, data_glob="", out_dir=out_dir))
    except KernelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
