"""The command line: `python -m kernel` (training, `sample`, `export`, `check-env`).

Not a notebook section: a notebook has its parameters cell instead. Every command reports bad input as one
line (`error: ...`, exit code 2), as the notebook does.

    python -m kernel --config configs/llm_cpu.yaml --set train.max_steps=500 --out outputs
    python -m kernel sample outputs --prompt "def "
    python -m kernel export outputs exported/
    python -m kernel check-env

It also runs under any torchrun, several machines included, e.g.

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 -m kernel ...
"""

import argparse
import re
import signal
import sys
from dataclasses import fields
from functools import partial
from pathlib import Path

import torch

from kernel.env import (DTYPES, KernelError, default_out_dir, describe_environment, dtype_name, print_environment,
                        resolve_device, resolve_dtype)
from kernel.config import SampleConfig, did_you_mean, load_config
from kernel.distributed import processes_to_launch
from kernel.checkpoint import given_checkpoint
from kernel.optim import optimizer_line
from kernel.progress import RunStopped, StopRequests
from kernel.sample import load_trained, sample_checkpoint
from kernel.export import checkpoint_facts, export_hf
from kernel.hf_interop import apply_pretrained
from kernel.memory import NAMED_DEVICES, DeviceSpec, fit_to_memory, plan_memory
from kernel.plan import estimated_tokens_per_s, plan_model, planned
from kernel.main import CPU_CONFIG, GPU_CONFIG, pick_config, resolve_config, run_or_launch, time_budget

COMMAND_HELP = {
    "sample": "text from a run folder or a checkpoint, e.g. python -m kernel sample outputs --prompt 'The '",
    "export": "a checkpoint as a transformers model folder with a model card: python -m kernel export outputs my-model",
    "check-env": "versions, devices, the precision a run with this config would train in, and its optimizer",
    "plan": "what fits in memory, per process, on this machine or a named device, and with model.size=auto the "
            "model a budget buys there: python -m kernel plan --device t4x2 --corpus 100MB",
}
# `plan --corpus`: tokens in a text of a given size (English; Chinese text takes ~3 bytes a character).
CHAR_BYTES_PER_TOKEN, BPE_BYTES_PER_TOKEN = 1.0, 4.0
ESTIMATED_MFU = 0.2  # `plan --device NAME`: the share of the data-sheet peak assumed, until a GPU measures it
BYTE_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)B?$", re.IGNORECASE)
SAMPLING_KEYS = [f.name for f in fields(SampleConfig) if f.name not in ("prompts", "eval_tokens")]  # eval_tokens: training only


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def sample_command(args: argparse.Namespace) -> None:
    prompts = args.prompt + [read_prompt_file(path) for path in args.prompt_file]
    if args.chat and prompts:
        raise KernelError("give questions with --chat or text to continue with --prompt/--prompt-file, not both")
    changes = {"prompts": args.chat or prompts or None, **{key: getattr(args, key) for key in SAMPLING_KEYS}}
    print(sample_checkpoint(args.checkpoint, changes, args.seed, args.device, flag_name, chat=bool(args.chat)))


def read_prompt_file(path: str) -> str:
    """A prompt file's text as it is, but for one final line break (which editors add by themselves)."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise KernelError(f"--prompt-file {path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise KernelError(f"--prompt-file {path}: {err.strerror or err}") from None
    return text.removesuffix("\n").removesuffix("\r")


def export_command(args: argparse.Namespace) -> None:
    path, checkpoint = given_checkpoint(args.checkpoint)
    config, tokenizer, model = load_trained(path, checkpoint)
    folder = export_hf(model, tokenizer, config, args.out, checkpoint_facts(path, checkpoint), force=args.force)
    print(f"exported {path} (step {checkpoint.step:,}) to {folder}")


def check_env_command(args: argparse.Namespace) -> None:
    config = resolve_config(args.config, args.overrides)
    print_environment(describe_environment())
    requested = args.device or config.train.device
    devices = [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())] if requested == "auto" else []
    for device in devices or [resolve_device(requested)]:
        # the rule a run with this config follows (a resumed run keeps its checkpoint's precision)
        dtype, why = resolve_dtype(config.train.dtype, device, config.model.n_embd)
        print(f"[env] device {device} | dtype {dtype_name(dtype)} ({why})")
        print(f"[env] {optimizer_line(config.train, device)}")
    count = processes_to_launch(config.train.devices, requested)
    print(f"[env] train.devices={config.train.devices} trains with {count} "
          f"process{'es (torchrun, one per GPU)' if count > 1 else ''}")
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
              "       python -m kernel {sample,export,check-env,plan} ...",
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
    parser.add_argument("--chat", action="append", default=[], metavar="QUESTION",
                        help="a question for a model trained on conversations (repeatable): put into its chat "
                        "template, answered up to the end of the assistant's turn")
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


def plan_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="python -m kernel plan", description=f"Show {COMMAND_HELP['plan']}.")
    parser.add_argument("--config", default="auto", help="the config a run would use (as for training)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="e.g. --set model.init_from=FOLDER (a folder holding only config.json will do)")
    parser.add_argument("--device", default="auto", help=f"{', '.join(NAMED_DEVICES)}, or auto: this machine "
                        "(default)")
    parser.add_argument("--corpus", default=None, metavar="SIZE",
                        help="with model.size=auto (the GPU preset's): the text's size, e.g. 100MB or 1GB (tokens "
                        f"estimated: {CHAR_BYTES_PER_TOKEN:g} byte a token with the char tokenizer, "
                        f"{BPE_BYTES_PER_TOKEN:g} with BPE, as for English)")
    parser.add_argument("--budget", default=None, help="with model.size=auto: the training time, e.g. 8h "
                        "(default: the config's train.time_budget)")
    parser.add_argument("--mfu", type=float, default=ESTIMATED_MFU, help="on a named device, the share of its "
                        f"data-sheet peak each shape is assumed to reach (default {ESTIMATED_MFU:g}: an estimate "
                        "until a GPU measures it)")
    return parser


def plan_command(args: argparse.Namespace) -> None:
    named = NAMED_DEVICES.get(args.device.lower())
    if named is None and args.device != "auto":
        raise KernelError(f"--device {args.device!r}: give one of {', '.join(NAMED_DEVICES)}, or auto (this machine)")
    source = GPU_CONFIG if named is not None and args.config == "auto" else pick_config(args.config)
    overrides = args.overrides + ([f"train.time_budget={args.budget}"] if args.budget else [])
    config = load_config(source, overrides, pretrained=partial(apply_pretrained, weights=False))
    vocab_size, vocab_note = planned_vocab_size(config)
    if config.model.size:
        config = planned_shape(config, vocab_size, named, args)
    print(f"[memory] {config.model.n_layer} layers x {config.model.n_embd} wide, context {config.model.block_size}, "
          f"global batch {config.train.batch_size * config.train.grad_accum_steps} sequences, {vocab_note}")
    if named is None:
        device = resolve_device(config.train.device)
        dtype = resolve_dtype(config.train.dtype, device, config.model.n_embd)[0]
        fit_to_memory(config, vocab_size, device, dtype, processes_to_launch(config.train.devices, config.train.device))
        return
    dtype = named.dtype if config.train.dtype == "auto" else DTYPES[config.train.dtype]
    plan = plan_memory(config, vocab_size, dtype, named.processes, named.memory, named.type, named.description)
    print(plan.report())


def planned_shape(config, vocab_size: int, named: DeviceSpec | None, args: argparse.Namespace):
    """model.size's plan for --corpus and the budget: throughput estimated from the named device's peak at --mfu,
    or measured on this machine (as a run would)."""
    size = parse_byte_size(args.corpus) if args.corpus else None
    if size is None and config.model.size == "auto":
        raise KernelError("model.size=auto plans the model for a corpus: give its size, e.g. --corpus 100MB")
    per_token = CHAR_BYTES_PER_TOKEN if config.tokenizer.mode == "char" else BPE_BYTES_PER_TOKEN
    unique_tokens = int(size / per_token) if size else 0
    budget = time_budget(config)
    if named is None:
        device = resolve_device(config.train.device)
        processes = processes_to_launch(config.train.devices, config.train.device)
        plan = plan_model(config, vocab_size, unique_tokens, budget, device, processes)
    else:
        estimate = estimated_tokens_per_s(config, vocab_size, named, args.mfu)
        plan = plan_model(config, vocab_size, unique_tokens, budget, torch.device("cpu"), named.processes,
                          tokens_per_s=estimate)
        print(f"[plan] {named.description}: each shape at {args.mfu:.0%} of the data-sheet peak (an estimate), "
              f"{unique_tokens / 1e6:,.1f}M tokens of text, {(budget or 0) / 3600:.1f} h")
    print(plan.report())
    return planned(config, plan.chosen.n_layer, plan.chosen.n_embd, plan.steps)


def parse_byte_size(text: str) -> float:
    """'100MB' -> 1e8 bytes (decimal units, as file managers and Kaggle show sizes)."""
    match = BYTE_SIZE.match(text.strip())
    if not match:
        raise KernelError(f"--corpus {text!r}: give a size such as 500KB, 100MB or 1GB")
    number, unit = match.groups()
    return float(number) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit.upper()]


def planned_vocab_size(config) -> tuple[int, str]:
    """The embedding's rows a run would have, without reading the data: a pretrained model's own; else the
    tokenizer's size where the config says it (bpe_simple), else a typical one, said so."""
    if config.model.init_from:
        return config.model.vocab_multiple, f"vocabulary {config.model.vocab_multiple:,} (the model's)"
    if config.tokenizer.mode == "bpe_simple":
        return config.tokenizer.vocab_size, f"vocabulary {config.tokenizer.vocab_size:,} (tokenizer.vocab_size)"
    guess = 256 if config.tokenizer.mode == "char" else 50_257
    return guess, f"vocabulary ~{guess:,} (an estimate: the tokenizer is built from the data)"


def cli(argv: list[str] | None = None) -> int:
    """`python -m kernel ...`: exit code 0 on success (a run stopped by a signal after it trained included),
    2 with a one-line explanation on bad input, 128 + the signal's number when stopped before training."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"sample": (sample_parser, sample_command), "export": (export_parser, export_command),
                "check-env": (check_env_parser, check_env_command), "plan": (plan_parser, plan_command)}
    try:
        with StopRequests():  # a signal before the work is done stops it (exit 128 + N); after, it is ignored
            if argv and argv[0] in commands:
                make_parser, command = commands[argv[0]]
                command(make_parser().parse_args(argv[1:]))
            elif argv and not argv[0].startswith("-"):
                raise KernelError(f"unknown command {argv[0]!r}{did_you_mean(argv[0], list(commands))} "
                                  "(`python -m kernel --help` lists the commands; with none, it trains)")
            else:
                args = build_parser().parse_args(argv)
                out_dir = args.out or default_out_dir()
                run_or_launch(resolve_config(args.config, args.overrides), out_dir,
                              dict(config=args.config, overrides=args.overrides, data_glob="", out_dir=out_dir))
    except RunStopped as stop:  # a stop signal before training: the usual exit code of a signalled program
        print(f"stopped: {stop}", file=sys.stderr)
        return 128 + signal.Signals[stop.signal_name].value
    except KernelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
