"""## 1. Environment

Where are we running (a laptop, a GPU box, or a Kaggle notebook), which device and number format will the
model use, and why. Also the one error type the whole program raises for bad input: `KernelError`, whose
message always names the culprit (a key, a file, a value) and what to do about it; and small helpers the
later sections share: atomic file writes, the names of the files a run writes, seeding, and the GPUs' peak
FLOP/s for model FLOPs utilisation (MFU).
"""

import errno
import json
import math
import os
import platform
import random
import re
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch


class KernelError(Exception):
    """A problem with the user's input or environment, explained in the message."""

    def _render_traceback_(self) -> list[str]:
        """How a notebook shows it (IPython asks for this): the message as one block, as the command line's
        `error:` line, not a traceback through the program's cells. `%env KERNEL_TRACEBACK=1` shows that."""
        if os.environ.get("KERNEL_TRACEBACK") == "1":
            return "".join(traceback.format_exception(type(self), self, self.__traceback__)).rstrip("\n").split("\n")
        return [f"{type(self).__name__}: {self}",
                "(the full traceback: run `%env KERNEL_TRACEBACK=1` in a cell, then this cell again)"]


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the mask means setting it; put it straight back
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; outputs get the usual permissions (0o666 minus umask).
FILE_MODE = 0o666 & ~current_umask()
TEMP_SUFFIX = ".tmp"  # write_atomic's temporary files: ".<name>.<random>.tmp" beside the target


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write to a temporary file in the same folder, fsync, rename (then fsync the folder): readers, crashes
    and full disks never see or leave half a file, and an existing file stays intact until the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        if hasattr(os, "fchmod"):  # POSIX
            os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def process_alive(pid: int) -> bool:
    """Whether a process with this PID exists (on this machine): half-written files of dead ones are debris."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    except OSError:  # e.g. Windows, where signal 0 is not a probe: assume alive, leave its files
        return True
    return True


def write_error_advice(err: OSError) -> str:
    """What to do about a failed write, by its cause: a full disk is not a permission problem."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full: free some space or choose another output folder (--out)"
    if err.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
        return ("the folder is not writable (permissions, a read-only file system, or an immutable file: "
                "see `ls -l` / `lsattr`): fix that or choose another output folder (--out)")
    return "check the folder, or choose another output folder (--out)"


def json_safe(value):
    """NaN and infinities as null: JSON has no such numbers (Python would write the invalid `NaN`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")


def count_words(count: float) -> str:
    """2.31M, 840K: parameter counts as people say them."""
    return f"{count / 1e6:.2f}M" if count >= 1e6 else f"{count / 1e3:.0f}K"


# --- The run's output folder ---------------------------------------------------------------------------
# What a run writes there, by name: every section uses these names (and a run's folder attached as an input
# is recognised by them, so it is never read as training text).
CONFIG_FILE, METRICS_FILE, SUMMARY_FILE = "config.yaml", "metrics.jsonl", "summary.json"
SAMPLES_FILE, CURVES_FILE, PROGRAM_FILE = "samples.txt", "loss.png", "train_gpt_program.py"
CHECKPOINTS_DIR, TOKENIZER_DIR, EXPORT_DIR, CACHE_DIR = "checkpoints", "tokenizer", "hf", "cache"
ADAPTER_DIR = "hf-adapter"  # with LoRA: the adapters in PEFT's format, beside the merged model in hf/
RUN_OUTPUT_NAMES = frozenset({SUMMARY_FILE, METRICS_FILE, SAMPLES_FILE, CURVES_FILE, CHECKPOINTS_DIR, CONFIG_FILE,
                              PROGRAM_FILE})


# --- Where we run --------------------------------------------------------------------------------------

def is_kaggle() -> bool:
    """Kaggle sets KAGGLE_KERNEL_RUN_TYPE ('Interactive' in the editor, 'Batch' for Save Version)."""
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE"))


def is_batch_run() -> bool:
    """A Save Version / CLI run on Kaggle: nobody watches, progress bars do not animate in its log."""
    return os.environ.get("KAGGLE_KERNEL_RUN_TYPE") == "Batch"


def kaggle_root() -> Path:
    """/kaggle, or KERNEL_KAGGLE_ROOT (tests stand a temporary folder in for it)."""
    return Path(os.environ.get("KERNEL_KAGGLE_ROOT", "/kaggle"))


ATTACHED_SEARCH_DEPTH = 7  # /kaggle/input/models/<owner>/<model>/<framework>/<variation>/<version>/ and one more


def attached_folders(name: str, wanted) -> list[Path]:
    """Folders under Kaggle's /kaggle/input that `wanted(folder)` accepts and whose path holds `name` as whole
    parts (any case): "qwen-3", "qwen-3/transformers/0.6b" or "/kaggle/input/qwen-3" find
    /kaggle/input/models/qwen-lm/qwen-3/transformers/0.6b/1 (the 2026 layout) as well as
    /kaggle/input/qwen-3/transformers/0.6b/1 (the older one)."""
    root = kaggle_root() / "input"
    given = Path(name.strip())
    for prefix in (root, Path("/kaggle/input")):  # the path the README and Kaggle show, whatever the root here
        if given.parts[:len(prefix.parts)] == prefix.parts:
            given = Path(*given.parts[len(prefix.parts):])
    parts = [part.lower() for part in given.parts if part not in (".", "")]
    if not root.is_dir() or not parts or given.is_absolute():
        return []
    found = []
    for folder, subfolders, _ in os.walk(root):
        relative = [part.lower() for part in Path(folder).relative_to(root).parts]
        depth_left = len(relative) < ATTACHED_SEARCH_DEPTH
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".")) if depth_left else []
        holds_name = any(relative[i:i + len(parts)] == parts for i in range(len(relative) - len(parts) + 1))
        if holds_name and wanted(Path(folder)):
            found.append(Path(folder))
    return found


def default_out_dir() -> str:
    """Outputs land where the platform keeps them: /kaggle/working on Kaggle, ./outputs elsewhere."""
    return str(kaggle_root() / "working" / "outputs") if is_kaggle() else "outputs"


# Kaggle ends GPU sessions after about 9 hours (older documents say 12): stop, evaluate and save well before.
KAGGLE_TIME_BUDGET_S = 8 * 3600


# --- Device and number format --------------------------------------------------------------------------

def resolve_device(requested: str) -> torch.device:
    """'auto' picks the first CUDA GPU when there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise KernelError(f"train.device={requested!r} but no CUDA GPU is visible; use train.device=auto or cpu")
    return torch.device(requested)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# On a CPU with native bf16 matrix instructions, bf16 autocast from this model width up (bench/cpu_dtype.py:
# 1.3-1.7x fp32's speed from 256 up on an AVX512-BF16 EPYC; smaller gains that come and go with load below).
CPU_BF16_MIN_WIDTH = 256


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX (Intel Sapphire Rapids+, AMD Zen 4+): bf16 matmuls run at about twice fp32's rate."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:  # not Linux: no way to tell cheaply, so fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_capability(device: torch.device) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(device)
    return major, minor


def resolve_dtype(requested: str, device: torch.device, model_width: int = 0,
                  resumed: str | None = None) -> tuple[torch.dtype, str]:
    """The autocast dtype for this device (and, on a CPU, this model width), with the reason in words. The one
    rule for the planner, the trainer and check-env; `resumed`: the dtype a resumed checkpoint was trained in,
    which `auto` keeps.

    bf16 needs compute capability >= 8.0 to be real: torch.cuda.is_bf16_supported() also says True on a T4
    through slow emulation, so we decide by capability, and an explicit bfloat16 below 8.0 is refused. Below
    8.0 (T4, V100) fp16 uses the tensor cores and needs a gradient scaler. On a CPU a fixed rule, not a
    timing: a timing taken at the start of a run measured bf16 at 0.8x to 8x fp32 on the same model
    depending on the machine's load, so the same command trained in different precisions.
    """
    if requested != "auto":
        dtype = DTYPES[requested]
        if dtype == torch.float16 and device.type != "cuda":
            raise KernelError("train.dtype=float16 needs a CUDA GPU; on CPU use float32 or bfloat16")
        if dtype == torch.bfloat16 and device.type == "cuda" and cuda_capability(device)[0] < 8:
            raise KernelError(emulated_bf16_error(device))
        return dtype, f"train.dtype={requested} was requested"
    if resumed is not None:
        if resumed == "bfloat16" and device.type == "cuda" and cuda_capability(device)[0] < 8:
            return torch.bfloat16, ("as when the checkpoint was written; warning: this GPU has no bf16 hardware, "
                                    "so bfloat16 is emulated and slow")
        return DTYPES[resumed], "as when the checkpoint was written"
    if device.type == "cuda":
        major, minor = cuda_capability(device)
        if major >= 8:
            return torch.bfloat16, f"compute capability {major}.{minor} >= 8.0 has native bf16"
        if major >= 7:
            return torch.float16, (f"compute capability {major}.{minor} (e.g. T4, V100): no native bf16, "
                                   "using fp16 with a grad scaler")
        return torch.float32, f"compute capability {major}.{minor}: no fp16 tensor cores, fp32"
    if device.type == "cpu" and cpu_has_native_bf16() and model_width >= CPU_BF16_MIN_WIDTH:
        return torch.bfloat16, f"cpu with native bf16 and model.n_embd={model_width} >= {CPU_BF16_MIN_WIDTH}"
    if device.type == "cpu":
        native = "native bf16" if cpu_has_native_bf16() else "no native bf16"
        return torch.float32, (f"cpu: fp32 ({native}; bf16 autocast pays only with native bf16 and "
                               f"model.n_embd >= {CPU_BF16_MIN_WIDTH})")
    return torch.float32, f"{device.type}: fp32"


def emulated_bf16_error(device: torch.device) -> str:
    major, minor = cuda_capability(device)
    instead = ("train.dtype=float16 (with the grad scaler a run adds to it: what train.dtype=auto picks here)"
               if major >= 7 else "train.dtype=float32 (what train.dtype=auto picks here)")
    return (f"train.dtype=bfloat16 on {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}): "
            f"this GPU has no bf16 hardware (that needs 8.0, e.g. A100, L4, H100), so torch would emulate it, "
            f"slower than float32. Use {instead}")


def precision_advice(device: torch.device, dtype: torch.dtype) -> str:
    """What to change the number format to when a loss turns NaN or infinite in `dtype` on this device: fp32
    always works; bf16 (fp32's range) only where the GPU has it; on a T4 or V100 fp16 keeps its grad scaler."""
    if dtype == torch.float32:
        return ""
    if device.type == "cuda" and dtype == torch.float16 and cuda_capability(device)[0] >= 8:
        return "use train.dtype=bfloat16 or float32 instead of float16"
    if device.type == "cuda" and dtype == torch.float16:
        return ("use train.dtype=float32 instead of float16 (this GPU has no bf16 hardware: keep float16 with its "
                "grad scaler for speed)")
    return f"use train.dtype=float32 instead of {dtype_name(dtype)}"


def half_precision_setting(device: torch.device) -> str | None:
    """The half-precision setting that is fast on this GPU (memory advice), or None where there is none."""
    if device.type != "cuda":
        return None
    major = cuda_capability(device)[0]
    if major >= 8:
        return "train.dtype=bfloat16"
    return "train.dtype=float16 (with a grad scaler, as train.dtype=auto does)" if major >= 7 else None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- Peak throughput, for model FLOPs utilisation (MFU) ---------------------------------------------

# Dense tensor-core peaks per GPU from the vendors' data sheets (FLOP/s); float32 means plain fp32 (no TF32).
# A name matches when each of its words is in the device's name: the first match wins, so a variant (the
# H100 PCIe card runs at 756 TFLOP/s, the SXM module, "NVIDIA H100 80GB HBM3", at 989) comes before its model.
PEAK_FLOPS = {
    "T4": {"float16": 65e12, "float32": 8.1e12},
    "P100": {"float16": 18.7e12, "float32": 9.3e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 30.3e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 51e12},
    "H100 NVL": {"bfloat16": 835e12, "float16": 835e12, "float32": 60e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "H200 NVL": {"bfloat16": 835e12, "float16": 835e12, "float32": 60e12},
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
}
_MEASURED_CPU_PEAK: dict = {}


def measured_cpu_peak(dtype: torch.dtype) -> float:
    """The CPU's matmul FLOP/s in this dtype, measured once (best of a few 1024^3 products)."""
    import time
    if dtype not in _MEASURED_CPU_PEAK:
        private = torch.Generator().manual_seed(0)  # never touch the global RNG: resumed runs must replay it
        a, b = (torch.randn(1024, 1024, generator=private).to(dtype) for _ in range(2))
        best = float("inf")
        for _ in range(4):
            started = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - started)
        _MEASURED_CPU_PEAK[dtype] = 2 * 1024**3 / best
    return _MEASURED_CPU_PEAK[dtype]


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak for this dtype: from the table for known GPUs, measured on a CPU, else None."""
    if device.type == "cpu":
        return measured_cpu_peak(dtype)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    words = name.lower().replace("-", " ").split()  # "NVIDIA A100-SXM4-80GB", "NVIDIA H100 PCIe", "Tesla T4"
    for model, peaks in PEAK_FLOPS.items():
        if all(word in words for word in model.lower().split()):
            return peaks.get(dtype_name(dtype))
    return None


# --- Reproducibility -----------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# --- The environment report ----------------------------------------------------------------------------

# The oldest versions this program is tested with: Kaggle's GPU image (mid-2026), Python 3.11 locally.
TESTED_WITH = {"python": "3.11", "torch": "2.10", "transformers": "5.0", "tokenizers": "0.22", "numpy": "2.4",
               "pyyaml": "6.0", "tqdm": "4.67"}


def package_version(name: str) -> str:
    """The installed version, read from package metadata (importing transformers alone takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "missing"


def version_warnings(versions: dict) -> list[str]:
    """One line per package older than TESTED_WITH (or missing)."""
    def major_minor(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", text)[:2])

    warnings = []
    for name, tested in TESTED_WITH.items():
        found = versions.get(name, "missing")
        if found == "missing":
            warnings.append(f"{name} is not installed (tested with {tested})")
        elif major_minor(found) < major_minor(tested):
            warnings.append(f"{name} {found} is older than {tested}, the oldest version this was tested with")
    return warnings


def describe_environment() -> dict:
    """Versions and hardware, as a dict (printed at the start of a run, stored in summary.json)."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        **{name: package_version(name) for name in ("transformers", "tokenizers", "pyyaml", "tqdm")},
        "platform": sys.platform,
        "kaggle": os.environ.get("KAGGLE_KERNEL_RUN_TYPE", ""),
        "cpu_threads": torch.get_num_threads(),
        "gpus": [],
    }
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        info["gpus"].append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                             "capability": f"{props.major}.{props.minor}"})
    return info


def print_environment(info: dict) -> None:
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB, cc {g['capability']})" for g in info["gpus"])
    where = f"Kaggle ({info['kaggle']})" if info["kaggle"] else "local"
    print(f"[env] python {info['python']} | torch {info['torch']} | transformers {info['transformers']} | "
          f"tokenizers {info['tokenizers']} | numpy {info['numpy']} | pyyaml {info['pyyaml']} | tqdm {info['tqdm']}"
          f" | {where}")
    print(f"[env] GPUs: {gpus or 'none'} | CPU threads: {info['cpu_threads']}")
    for warning in version_warnings(info):
        print(f"[env] warning: {warning}")
