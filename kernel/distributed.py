"""## 13. Several GPUs: one process per GPU (DistributedDataParallel)

With more than one GPU the run becomes one process per GPU (`train.devices: auto`; a number chooses how
many), started by `torchrun` (PyTorch's launcher). Each process holds a copy of the model and trains on its
share of every batch; the gradients are averaged across processes before each update
(DistributedDataParallel). A notebook cannot fork itself into several GPU processes once CUDA is
initialised, so it writes this program (the code of its own cells, as they ran) to a file and runs
`torchrun --standalone --nproc_per_node=N FILE`, streaming the output. Cells you added go along, in the
order they ran, when they only define things (`def`, `class`, `import`, `name = value`): a redefined
function is used by every process. Any other added cell ran in the notebook only, and a line before the
launch names it.

Only rank 0 prints, writes logs, checkpoints and outputs. The global batch (micro-batch x accumulation x
processes) is the config's `batch_size x grad_accum_steps` whatever the number of processes, so runs
compare and a checkpoint written by N processes resumes on M.
"""

import ast
import contextlib
import gc
import linecache
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from kernel.env import PROGRAM_FILE, KernelError, resolve_device, write_atomic

# The first line of every code section of the notebook (build_kernel.py writes it; the launcher finds the
# cells by it).
SECTION_MARKER = "# kernel section {number} of {total}: {name}"
SECTION_MARKER_PATTERN = re.compile(r"# kernel section (\d+) of (\d+): ([\w-]+)$")
# Wall-clock time (time.time()) at which the launching process started: the time budget counts from there.
RUN_STARTED_ENV = "KERNEL_RUN_STARTED_AT"
# A file the launcher writes (holding a signal's name) to ask the training processes to stop after a step.
STOP_FILE_ENV = "KERNEL_STOP_FILE"
# Processes wait for each other this long at most: rank 0 may tokenize a large corpus or write a checkpoint
# while the others wait (NCCL's default of 10 minutes is too short for a big corpus).
COLLECTIVE_TIMEOUT = timedelta(minutes=60)
# How a process's bad-input error shows in its traceback (as kernel.env.KernelError, or KernelError in a notebook).
KERNEL_ERROR_LINE = re.compile(r"^(?:\[rank\d+\]: )?(?:kernel\.env\.)?KernelError: (.*)$")


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes (one process: rank 0 of 1)."""
    rank: int = 0
    local_rank: int = 0  # rank on this machine: which GPU to use
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def join_process_group(device_request: str) -> tuple[Processes, torch.device]:
    """Under torchrun: this process's rank and device (GPU number local_rank; NCCL between GPUs, gloo between
    CPU processes), joined to the others. Otherwise a single process on the requested device."""
    if not launched_by_torchrun():
        device = resolve_device(device_request)
        return Processes(device=device), device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_request)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return Processes(rank, local_rank, world_size, device), device


def leave_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        # DistributedDataParallel lives in reference cycles: free it (and the gloo/NCCL work it holds) now,
        # while the group and the interpreter are alive; freed at interpreter exit, it can abort the process.
        gc.collect()
        dist.destroy_process_group()


@contextlib.contextmanager
def only_main_prints(processes: Processes):
    """Other ranks' stdout goes nowhere (their errors still reach stderr)."""
    if processes.is_main:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


# --- Agreeing across processes (no-ops for one process) ------------------------------------------------

def sum_across(processes: Processes, tensor: torch.Tensor) -> torch.Tensor:
    if processes.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def max_across(processes: Processes, values: list[float]) -> list[float]:
    """The largest of every process's values, element by element: a stop wanted by one process is a stop
    for all, and clock-driven numbers (the share of the time budget used) become one number for all."""
    if not processes.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=processes.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def from_main(processes: Processes, value):
    """Rank 0's value, on every process (for decisions that must agree, such as a measured dtype)."""
    if not processes.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(processes: Processes, value) -> list:
    """Every process's value, in rank order, on every process."""
    if not processes.distributed:
        return [value]
    gathered = [None] * processes.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def wait_for_all(processes: Processes) -> None:
    if processes.distributed:
        dist.barrier()


# --- Sharing a batch -----------------------------------------------------------------------------------

def split_global_batch(micro: int, accum: int, world_size: int) -> tuple[int, int]:
    """Each process's (micro-batch, accumulation steps) for the global batch micro x accum: the process's
    share (global / world_size) in micro-batches no larger than `micro`, so memory per step never grows."""
    total = micro * accum
    if total % world_size:
        raise KernelError(
            f"the global batch (train.batch_size x train.grad_accum_steps = {micro} x {accum} = {total} "
            f"sequences) cannot be shared evenly by {world_size} processes: make it a multiple of {world_size}")
    share = total // world_size
    per_process = max(d for d in range(1, min(micro, share) + 1) if share % d == 0)
    return per_process, share // per_process


# --- How many processes, and launching them --------------------------------------------------------

def processes_to_launch(devices: int | str, device_request: str) -> int:
    """1 to train in this process; N > 1 to start N processes with torchrun. Under torchrun already: 1."""
    if launched_by_torchrun():
        return 1
    device = resolve_device(device_request)
    if devices == "auto":
        plain_cuda = device_request in ("auto", "cuda")
        return torch.cuda.device_count() if device.type == "cuda" and plain_cuda else 1
    if devices > 1 and device.type == "cuda" and devices > torch.cuda.device_count():
        raise KernelError(f"train.devices={devices} but {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                          "use train.devices=auto")
    if devices > 1 and device.type not in ("cuda", "cpu"):
        raise KernelError(f"train.devices={devices} needs CUDA GPUs or the CPU, not {device.type}")
    return devices


def ran_section_cells(namespace: dict) -> dict[int, str]:
    """The notebook's section cells as they ran (an edited and re-run cell counts in its new form), by
    number, found in the line cache where IPython keeps every cell it ran (for tracebacks)."""
    live_files = {value.__code__.co_filename for value in namespace.values() if isinstance(value, types.FunctionType)}
    found: dict[int, tuple[bool, int, str]] = {}  # section number -> (in use, total sections, code)
    for filename, entry in list(linecache.cache.items()):
        lines = entry[2] if len(entry) > 2 else None
        match = SECTION_MARKER_PATTERN.match(lines[0].rstrip("\n")) if lines else None
        if not match:
            continue
        number, live = int(match[1]), filename in live_files
        if number not in found or live or not found[number][0]:  # prefer the cell whose functions are in use
            found[number] = (live, int(match[2]), "".join(lines))
    chosen = [entry for entry in found.values() if entry[0]] or list(found.values())
    total = chosen[-1][1] if chosen else 0
    missing = [n for n in range(1, total + 1) if n not in found]
    if not total or missing:
        raise KernelError("the notebook's code cells were not all run in this session (missing sections "
                          f"{missing or 'all'}): use Run All, so the training processes get the whole program")
    return {n: found[n][2].rstrip("\n") for n in range(1, total + 1)}


# What a cell the user added may hold to be carried into the training processes: definitions, which are safe to
# run again there. Anything else (a call, a loop, a shell command) ran once in the notebook and is left out.
DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)
LAUNCHING_FUNCTIONS = {"main", "sample_from_run"}  # a cell calling these is a run cell, never part of the program


def dotted_name(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) or isinstance(node, ast.Attribute) and dotted_name(node.value)


def literal(node: ast.AST) -> bool:
    try:
        ast.literal_eval(node)
        return True
    except ValueError:
        return False


def literal_assignment(statement: ast.stmt) -> bool:
    """`NAME = literal`, as in a parameters cell."""
    return (isinstance(statement, ast.Assign) and all(isinstance(t, ast.Name) for t in statement.targets)
            and literal(statement.value))


def definition(statement: ast.stmt) -> bool:
    """def, class, import, a docstring, or a (dotted) name bound to a literal or a name: `GPT.forward = mine`."""
    bound_plainly = (isinstance(statement, ast.Assign) and all(dotted_name(t) for t in statement.targets)
                     and (literal(statement.value) or dotted_name(statement.value)))
    docstring = isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
    return isinstance(statement, DEFINITIONS) or bound_plainly or docstring


def cell_kind(code: str) -> str:
    """'section', 'launch' (it runs or samples), 'values' (literal assignments only: a parameters cell),
    'definitions', or 'other'."""
    if SECTION_MARKER_PATTERN.match(code.split("\n", 1)[0].rstrip()):
        return "section"
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return "other"
    if any(isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in LAUNCHING_FUNCTIONS
           for node in ast.walk(tree)):
        return "launch"
    if all(literal_assignment(s) for s in tree.body):
        return "values"
    return "definitions" if all(definition(s) for s in tree.body) else "other"


def added_cells(namespace: dict) -> tuple[dict[int, list[str]], list[int], list[int]]:
    """The cells the user ran besides the notebook's own, from IPython's input history (`_ih`, in the order
    they ran): definition cells by the section they followed, and the numbers (In [n]) of the definition
    cells and of the other cells, which the training processes will not run."""
    history = namespace.get("_ih") or []
    after: dict[int, list[str]] = {}
    carried, left_out, section = [], [], 0
    for number, code in enumerate(history[:-1]):  # the last one is the cell launching this run
        kind = cell_kind(code) if code.strip() else "empty"
        if kind == "section":
            section = int(SECTION_MARKER_PATTERN.match(code.split("\n", 1)[0].rstrip())[1])
        elif kind in ("definitions", "values"):
            after.setdefault(section, []).append(code.rstrip("\n"))
            carried += [number] if kind == "definitions" else []
        elif kind == "other":
            left_out.append(number)
    return after, carried, left_out


def notebook_sections_source(namespace: dict) -> str:
    """The program the notebook's cells make: its sections as they last ran and, in the order they ran, the
    definition cells the user added (a redefined function, an import). Says in one line which added cells
    the training processes will not run."""
    sections = ran_section_cells(namespace)
    after, carried, left_out = added_cells(namespace)
    cells = [*after.get(0, [])]
    for number, code in sections.items():
        cells += [code, *after.get(number, [])]
    if carried:
        print(f"[dist] your added cell(s) {cell_list(carried)} hold only definitions: the training processes "
              "run them too, in notebook order", flush=True)
    if left_out:
        print(f"[dist] your added cell(s) {cell_list(left_out)} ran here only: the training processes run the "
              "notebook's sections and added cells that hold only definitions (def, class, import, name = value)",
              flush=True)
    return "\n\n".join(cells) + "\n"


def cell_list(numbers: list[int]) -> str:
    return ", ".join(f"In [{n}]" for n in numbers)


def program_source(call: dict, namespace: dict, package: str | None) -> str:
    """A script that runs main(**call): the notebook's own cells, or (when this code is a package) an import."""
    arguments = {k: v for k, v in call.items() if k != "processes"}
    try:
        ast.literal_eval(repr(arguments))
    except (ValueError, SyntaxError):
        raise KernelError(f"the run's settings must be plain values (text, numbers, lists, dicts) to be passed to "
                          f"the training processes, got {arguments!r}") from None
    if package:
        root = str(Path(sys.modules[package].__path__[0]).parent)
        head = f"import sys\nsys.path.insert(0, {root!r})\nfrom {package}.main import main\n"
    else:
        head = notebook_sections_source(namespace)
    return (f"{head}\n\n# Written by the launching process: one of the {call.get('processes', 'N')} training "
            "processes torchrun starts.\n"
            "from torch.distributed.elastic.multiprocessing.errors import record\n"
            f"record(main)(**{arguments!r})\n")


def launcher_stop_request() -> str | None:
    """The signal the launcher passed on through its stop file, if it did (checked by every process, every step)."""
    path = os.environ.get(STOP_FILE_ENV)
    if not path or not os.path.exists(path):
        return None
    return Path(path).read_text(encoding="utf-8").strip() or "SIGTERM"


@contextlib.contextmanager
def forwarding_stop_signals(proc: subprocess.Popen, stop_file: Path, received: list):
    """SIGTERM / SIGINT to this process (Kaggle ending the session, a notebook's interrupt, Ctrl-C) write the
    stop file: every training process stops after the current step, checkpoints and writes its outputs, with
    no deadline (torchrun itself, in its own session, sees no signal: it would kill them after 30 s). A second
    signal means now: torchrun's whole process group gets SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame) -> None:
        received.append(signal.Signals(signum).name)
        if len(received) == 1:
            stop_file.write_text(received[0], encoding="utf-8")
        elif proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launch_torchrun(program: str, processes: int, folder: Path, started_at: float) -> None:
    """Write the program into `folder`, run it with torchrun, echo its output live, fail if it fails."""
    path = folder / PROGRAM_FILE
    write_atomic(path, program)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(path)]
    print(f"[dist] {processes} processes: torchrun --standalone --nproc_per_node={processes} {path}", flush=True)
    errors, received = [], []
    with tempfile.TemporaryDirectory(prefix="kernel-launch-") as control:
        stop_file = Path(control) / "stop"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", RUN_STARTED_ENV: repr(started_at), STOP_FILE_ENV: str(stop_file)}
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                              errors="replace", bufsize=1, start_new_session=True) as proc, \
                forwarding_stop_signals(proc, stop_file, received):
            for line in proc.stdout:
                print(line, end="", flush=True)
                if explained := KERNEL_ERROR_LINE.search(line):
                    errors.append(explained[1].strip())
            code = proc.wait()
    if received:
        print(f"[dist] stopped by {received[0]}: the training processes saved a checkpoint; run again to resume",
              flush=True)
    if code != 0:
        reason = f": {errors[0]}" if errors else "; its output above shows which process failed and why"
        raise KernelError(f"the {processes}-process training run failed (torchrun exit code {code}){reason}")


def run_started_at() -> float:
    """When the whole run started (the launching process's clock when there is one), as time.time()."""
    return float(os.environ.get(RUN_STARTED_ENV, time.time()))
