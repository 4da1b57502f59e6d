"""## 14. Checkpoints

A checkpoint holds everything a resumed run needs to continue exactly where it stopped: the weights (with
LoRA only the adapters and a fingerprint of the pretrained weights they belong to, section 12), the
optimizer and grad-scaler states, the step, the batch sampler's position, every process's random-number
state, the config and the tokenizer. The metrics so far are not in it: `metrics.jsonl` beside the
checkpoints is their record, and a resumed run reads it back up to the checkpoint's step. One dataclass, `Checkpoint`, names those fields:
the training loop fills one in, `save_checkpoint` writes it and `load_checkpoint` reads the same fields
back, so the format is defined in one place.

Files are `checkpoints/ckpt_<step>.pt`, each with a `.sha256` beside it that is written last: a checkpoint
without its checksum was interrupted while being written and is never resumed from (the `sample` and
`export` commands load a lone copied file with a warning). Resuming takes the newest checkpoint that loads
(on Kaggle also from an earlier version of the notebook attached as an input), and refuses one whose model
shape, tokenizer or optimizer differ from the config's. A `wsd` run whose decay the time budget started
resumes from the checkpoint saved just before that decay, so the new session's budget decays afresh. The
newest `train.keep_checkpoints` are kept, plus the best by validation loss and that pre-decay one.
"""

import glob
import hashlib
import io
import json
import random
import shutil
import sys
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from kernel.env import (CACHE_DIR, CHECKPOINTS_DIR, METRICS_FILE, TEMP_SUFFIX, KernelError, is_kaggle, kaggle_root,
                        process_alive, write_atomic, write_error_advice)
from kernel.tokenization import tokenizer_class
from kernel.config import Config, config_from_dict, config_to_dict
from kernel.distributed import Processes

CHECKPOINT_FORMAT = 3  # 3: no metrics history inside (read from metrics.jsonl)
CHECKPOINT_PATTERN = "ckpt_*.pt"


@dataclass
class Checkpoint:
    step: int                 # optimizer steps taken
    tokens: int               # training tokens seen
    train_loss: float         # the last logged training loss
    last_eval: dict           # the last evaluation's figures (step, losses, ppl, bpb)
    best: dict                # {"step", "val_loss"} of the best evaluated checkpoint kept on disk
    dtype: str                # the precision the run trains in (kept on resume)
    loss_window: dict         # {"sum", "steps"}: training losses since the last log line (exact metrics on resume)
    micro_batch: int          # the batch plan as last used (an out-of-memory retry may have shrunk it)
    grad_accum_steps: int
    world_size: int           # the number of processes that trained
    process_rngs: list        # every process's RNG states (dropout), in rank order
    lr_phase: str             # wsd: "stable" (saved as the decay began), "decay", "budget_decay" (see below); else ""
    stable_step: int | None   # the step of the run's newest "stable" checkpoint, kept on disk by pruning
    lora: dict                # LoRA: the adapters' settings and base_fingerprint (model holds only the adapters); else {}
    sessions: list            # one entry per session (notebook version) that trained up to here (see below)
    config: dict
    tokenizer: dict
    model: dict
    optimizer: dict
    scaler: dict
    sampler: dict
    metrics: list | None = None  # format 2 and older: every metrics record so far (now read from metrics.jsonl)

    def payload(self) -> dict:
        """What torch.save writes: the fields (but an absent history), plus the format number."""
        saved = {f.name: getattr(self, f.name) for f in fields(self)}
        if saved["metrics"] is None:
            del saved["metrics"]
        return {"format": CHECKPOINT_FORMAT, **saved}

    @classmethod
    def from_payload(cls, payload: dict, path: Path) -> "Checkpoint":
        payload = upgrade_payload(payload)
        required = [f.name for f in fields(cls) if f.default is MISSING]
        if missing := [name for name in required if name not in payload]:
            raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: it was not written by this program")
        return cls(**{f.name: payload[f.name] for f in fields(cls) if f.name in payload})


def upgrade_payload(payload: dict) -> dict:
    """Older checkpoints: before several processes they held one RNG state ("rng") and no process count;
    before exact metrics on resume, no loss window; before stable-phase checkpoints, no phase; before LoRA, no
    adapters (the model holds every weight); before sessions were recorded, none (`earlier_sessions` stands
    one in)."""
    if "process_rngs" not in payload and "rng" in payload:
        payload = {**payload, "process_rngs": [payload["rng"]], "world_size": payload.get("world_size", 1)}
    return {"loss_window": {"sum": 0.0, "steps": 0}, "lr_phase": "", "stable_step": None, "lora": {},
            "sessions": [], **payload}


# A session is one process run of the training (a notebook version): {"started_step", "ended_step", "tokens"
# (trained in it), "train_seconds" (its training loop: steps, evaluations, checkpoints), "step_seconds" (inside
# optimizer steps: throughput), "stopped_by" (None while it trains)}. A checkpoint holds those up to its step.

def earlier_sessions(checkpoint: Checkpoint) -> list[dict]:
    """The sessions that trained up to a checkpoint, as a run resuming it continues them: the last one closed
    at the checkpoint's step (a session still training when it saved was interrupted, or is kept only to its
    stable phase); a checkpoint older than session records stands for one session of unknown time."""
    sessions = [dict(session) for session in checkpoint.sessions]
    if not sessions and checkpoint.step:
        sessions = [{"started_step": 0, "ended_step": checkpoint.step, "tokens": checkpoint.tokens,
                     "train_seconds": None, "step_seconds": None, "stopped_by": None}]
    if sessions and sessions[-1]["stopped_by"] is None:
        sessions[-1]["stopped_by"] = ("continued from its stable phase" if checkpoint.lr_phase == "stable"
                                      else "interrupted (continued from its last checkpoint)")
    return sessions


def run_folder(path: Path) -> Path:
    """The output folder of the run that wrote a checkpoint file (the folder above its checkpoints/)."""
    return path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path.parent


def saved_metrics(path: Path, checkpoint: Checkpoint) -> list[dict] | None:
    """The metrics records a checkpoint's run had written up to its step: from an old checkpoint itself, else
    from the metrics.jsonl of its run folder (an earlier Kaggle version's too), later steps left out (they
    replay, or belong to an abandoned decay). None when neither is there (a checkpoint copied alone)."""
    if checkpoint.metrics is not None:
        return list(checkpoint.metrics)
    metrics = run_folder(path) / METRICS_FILE
    if not metrics.is_file():
        return None
    records = []
    with open(metrics, encoding="utf-8") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a killed process
                continue
            if record.get("step", 0) <= checkpoint.step:
                records.append(record)
    return records


# --- Writing -------------------------------------------------------------------------------------------

def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"ckpt_{step:08d}.pt"


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, oldest step first."""
    return sorted(folder.glob(CHECKPOINT_PATTERN)) if folder.is_dir() else []


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    """The checkpoint and, beside it, the SHA-256 of its bytes (written last: no checksum, no checkpoint)."""
    buffer = io.BytesIO()
    torch.save(checkpoint.payload(), buffer)
    data = buffer.getbuffer()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        write_atomic(checksum_path(path), hashlib.sha256(data).hexdigest().encode())
    except OSError as err:
        path.unlink(missing_ok=True)
        previous = [p.name for p in list_checkpoints(path.parent) if p != path]
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:,.1f} MB free there"
        except OSError:
            free = "free space unknown"
        raise KernelError(f"could not write checkpoint {path}: {err.strerror or err}; it needs "
                          f"{len(data) / 2**20:,.1f} MB ({free}). The previous checkpoint "
                          f"{previous[-1] if previous else '(none yet)'} is intact. {write_error_advice(err)}"
                          ) from None


def remove_output_debris(out_dir: Path) -> None:
    """What a run that died left in its output folder: write_atomic's temporary files, checksums whose
    checkpoint is gone, and half-written folders (`<name>.partial-PID`, token caches included) of processes
    that no longer run.
    Called by the run holding the folder's lock: nobody else is writing there."""
    for folder in (out_dir, out_dir / CHECKPOINTS_DIR, out_dir / CACHE_DIR):
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            temporary = path.is_file() and path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)
            orphan = path.name.endswith(".sha256") and not path.with_name(path.name.removesuffix(".sha256")).exists()
            pid = path.name.rpartition(".partial-")[2]
            dead_partial = path.is_dir() and pid.isdigit() and not process_alive(int(pid))
            if temporary or orphan:
                path.unlink(missing_ok=True)
            elif dead_partial:
                shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(folder: Path, keep: int, protected: set) -> None:
    """Delete all but the newest `keep` checkpoints and the `protected` steps (the best one, the stable-phase
    one), with their checksums."""
    kept = set(list_checkpoints(folder)[-keep:]) | {checkpoint_path(folder, step) for step in protected if step is not None}
    for old in list_checkpoints(folder):
        if old not in kept:
            old.unlink()
            checksum_path(old).unlink(missing_ok=True)


# --- Reading -------------------------------------------------------------------------------------------

class CheckpointError(KernelError):
    """A checkpoint file that is incomplete, truncated or corrupted."""


def load_checkpoint(path: str | Path, require_checksum: bool = True) -> Checkpoint:
    """A checkpoint whose bytes match its checksum, loaded with weights_only=True (no code runs) and memory-mapped
    (its tensors are paged in as they are used, never held twice: a large model's checkpoint fits Kaggle's RAM).
    require_checksum=False also loads one without a checksum file (a user's copy of a single file); a checksum
    file that is there must still match."""
    path = Path(path)
    if not path.is_file():
        raise KernelError(f"checkpoint {path} does not exist")
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        if require_checksum:
            raise CheckpointError(f"checkpoint {path} has no checksum file {sidecar.name}: its writing was interrupted")
    elif file_sha256(path) != sidecar.read_text().strip():
        raise CheckpointError(f"checkpoint {path} does not match its checksum: it is truncated or corrupted")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from None
    return Checkpoint.from_payload(payload, path)


def file_sha256(path: Path) -> str:
    """The file's SHA-256, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# --- Choosing a checkpoint ------------------------------------------------------------------------------
# One set of rules for every caller: resuming (train.resume) and the sample/export commands. A folder means
# its checkpoints or its checkpoints/ subfolder's; the newest one that loads wins. A file without its
# .sha256 is an interrupted write in a run folder, but a lone copy (downloaded from Kaggle's Output tab) when
# the commands are given one (`copies`): then it loads with a warning.

def resume_warning(message: str) -> None:
    print(f"[resume] warning: {message}")


def command_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def checkpoints_in(folder: Path) -> list[Path]:
    """A run folder's checkpoints (in its checkpoints/) or a checkpoints folder's own, oldest first."""
    return list_checkpoints(folder) or list_checkpoints(folder / CHECKPOINTS_DIR)


def load_copy(path: Path, warn) -> Checkpoint:
    if checksum_path(path).is_file():
        return load_checkpoint(path)
    warn(f"{path} has no checksum file {checksum_path(path).name} (copied alone?): loaded without verifying it")
    return load_checkpoint(path, require_checksum=False)


def newest_valid(candidates: list[Path], warn=resume_warning, copies: bool = False) -> tuple[Path, Checkpoint]:
    """The newest checkpoint that loads; damaged newer ones are skipped with a warning. With `copies`, files
    without a checksum are passed over, and when none has one the newest loads unverified."""
    problems = []
    for path in reversed(candidates):
        if copies and not checksum_path(path).is_file():
            continue
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError as err:
            warn(f"{err}; trying the one before it")
            problems.append(str(err))
            continue
        if problems:
            warn(f"using {path.name}, an older checkpoint, because the newer ones are damaged")
        return path, checkpoint
    if copies and not problems:
        return candidates[-1], load_copy(candidates[-1], warn)
    raise KernelError("no usable checkpoint: " + "; ".join(problems) +
                      (". Set train.resume=never (or another --out) to start a new run" if not copies else ""))


def choose_checkpoint(given: str | Path, warn=resume_warning, copies: bool = False,
                      name: str = "") -> tuple[Path, Checkpoint]:
    """A checkpoint file, or the newest valid checkpoint of a run folder. `name`: how messages call `given`."""
    path = Path(given).expanduser()
    name = name or str(given)
    if path.is_dir():
        found = checkpoints_in(path)
        if not found:
            raise KernelError(f"{name}: {path} holds no checkpoint ({CHECKPOINT_PATTERN}, in it or in its "
                              "checkpoints/ folder): give a run's output folder or a checkpoint file")
        return newest_valid(found, warn, copies)
    if not path.is_file():
        raise KernelError(f"{name}: no such checkpoint file or run folder")
    return path, (load_copy(path, warn) if copies else load_checkpoint(path))


def given_checkpoint(path: str | Path) -> tuple[Path, Checkpoint]:
    """What the sample and export commands are given: a run folder (its newest valid checkpoint) or a
    checkpoint file, which may be a lone copy."""
    return choose_checkpoint(path, command_warning, copies=True)


def attached_checkpoints() -> list[Path]:
    """Checkpoints in the outputs of earlier notebook versions attached as inputs (kernel_sources), in the
    2026 layout (/kaggle/input/notebooks/<owner>/<slug>/...) and the older one (/kaggle/input/<slug>/...)."""
    root = kaggle_root() / "input"
    return sorted(Path(p) for p in glob.glob(str(root / "**" / CHECKPOINTS_DIR / CHECKPOINT_PATTERN), recursive=True))


def find_resume_checkpoint(resume: str, out_dir: Path) -> tuple[Path, Checkpoint] | None:
    """train.resume: 'never', 'auto' (the newest valid checkpoint in out_dir or, on Kaggle, in an attached
    earlier version's output), a run folder, or a file."""
    if resume == "never":
        return None
    if resume == "auto":
        attached = attached_checkpoints() if is_kaggle() else []
        # by step; at equal steps the output folder's own checkpoint sorts last, so it is tried first
        found = sorted(set(list_checkpoints(out_dir / CHECKPOINTS_DIR) + attached), key=lambda p: (p.name, p not in attached))
        return before_budget_decay(*newest_valid(found)) if found else None
    path, checkpoint = choose_checkpoint(resume, name=f"train.resume={resume!r} (or 'auto', 'never')")
    return before_budget_decay(path, checkpoint) if Path(resume).is_dir() else (path, checkpoint)


def before_budget_decay(path: Path, checkpoint: Checkpoint) -> tuple[Path, Checkpoint]:
    """A wsd run whose decay the time budget drove (a finished session, or one stopped while decaying) goes on
    from its stable-phase checkpoint: a new session's budget starts the schedule's clock again, and decayed
    weights at the peak learning rate would undo the decay. Its later metrics are dropped with it."""
    stable = checkpoint_path(path.parent, checkpoint.stable_step) if checkpoint.stable_step is not None else None
    if checkpoint.lr_phase != "budget_decay" or stable is None or stable == path:
        return path, checkpoint
    try:
        earlier = load_checkpoint(stable)
    except (KernelError, OSError) as err:  # missing or damaged
        print(f"[resume] warning: {path.name} is past its learning-rate decay but its stable-phase checkpoint "
              f"cannot be used ({err}); resuming from {path.name}")
        return path, checkpoint
    print(f"[resume] {path.name} (step {checkpoint.step:,}) ends a time budget's learning-rate decay: continuing the "
          f"stable phase from {stable.name} (step {earlier.step:,}); this run decays at the end of its own budget")
    return stable, earlier


# Model settings that may change between a checkpoint and the run resuming it (the weights still fit; the
# weights model.init_from named are only loaded by a run that starts at step 0).
RESUMABLE_MODEL_CHANGES = {"dropout", "gradient_checkpointing", "init_from"}


def check_resume_compatible(checkpoint: Checkpoint, config: Config, path: Path) -> None:
    """The run resuming a checkpoint must have its model shape, its tokenizer (a different one would silently
    train on other token ids, or not fit the weights) and its optimizer (whose state the checkpoint holds)."""
    current = config_to_dict(config)["model"]
    saved = {**config_to_dict(Config())["model"], **checkpoint.config["model"]}  # a key it predates: its default
    changed = [k for k in current if k not in RESUMABLE_MODEL_CHANGES and saved[k] != current[k]]
    if changed:
        details = ", ".join(f"model.{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
        raise KernelError(f"cannot resume from {path}: the model shape changed ({details}); {START_AFRESH}")
    check_same_tokenizer(checkpoint, config, path)
    optimizer_before = checkpoint.config["train"].get("optimizer", "adamw")  # older checkpoints: AdamW
    if optimizer_before != config.train.optimizer:
        raise KernelError(f"cannot resume from {path}: train.optimizer changed ({optimizer_before!r} -> "
                          f"{config.train.optimizer!r}), and the optimizer's state cannot carry over; set it back "
                          f"to {optimizer_before!r}, or {START_AFRESH}")


START_AFRESH = "set train.resume=never or choose another --out folder to start a new run"


def check_same_tokenizer(checkpoint: Checkpoint, config: Config, path: Path) -> None:
    saved = config_from_dict(checkpoint.config, f"{path} (saved config)").tokenizer
    before, now = (tokenizer_class(s.mode, "in tokenizer.mode").fingerprint(s) for s in (saved, config.tokenizer))
    if before != now:
        details = ", ".join(f"tokenizer.{k}: {before.get(k)!r} -> {now.get(k)!r}"
                            for k in dict.fromkeys([*before, *now]) if before.get(k) != now.get(k))
        raise KernelError(f"cannot resume from {path}: the tokenizer changed ({details}); {START_AFRESH}")
    current = tokenizer_class(config.tokenizer.mode, "in tokenizer.mode").current_state(config.tokenizer)
    comparable = current is not None and set(current) == set(checkpoint.tokenizer)  # older checkpoints: a name
    if comparable and current != checkpoint.tokenizer:
        raise KernelError(f"cannot resume from {path}: the tokenizer at tokenizer.pretrained_name="
                          f"{config.tokenizer.pretrained_name!r} is not the one the checkpoint was trained with "
                          f"(its files changed); restore them, or {START_AFRESH}")


# --- Random-number states ------------------------------------------------------------------------------

def rng_states() -> dict:
    bit_generator, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [bit_generator, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else []}  # this process's GPU


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    bit_generator, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((bit_generator, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():  # older checkpoints hold every visible GPU's state
        torch.cuda.set_rng_state(states["cuda"][min(torch.cuda.current_device(), len(states["cuda"]) - 1)])


def restore_process_rng(checkpoint: Checkpoint, processes: Processes, seed: int) -> None:
    """Each process's own RNG state when the checkpoint has one for it (same number of processes), else rank
    0's on rank 0 and a fresh seed per rank elsewhere (the RNG only drives dropout; data has its own)."""
    saved = checkpoint.process_rngs
    if len(saved) == processes.world_size or processes.is_main:
        restore_rng_states(saved[processes.rank if len(saved) == processes.world_size else 0])
    else:
        torch.manual_seed(seed + processes.rank + checkpoint.step)
