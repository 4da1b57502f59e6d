"""`python -m kernel` for the distributed tests, run by torchrun, with two test-only additions:

    torchrun ... tests/dist_worker.py '{"audit": DIR, "fail_rank": 1, "fail_at_step": 3}' -- --config ... --out ...

- audit: every write-like file operation (open for writing, rename, mkdir, remove) under the output folder
  is recorded by a Python audit hook and listed in DIR/rank<N>.json at exit, to show who writes what.
- fail_rank / fail_at_step: that rank raises an error in its training step number fail_at_step.
- step_clock: the time budget's clock advances this many seconds per training step and not otherwise
  (tests.conftest.StepClock), so a budget means the same number of steps on a busy machine.
"""

import atexit
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
WRITE_EVENTS = {"os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree",
                "os.symlink", "os.link"}


def install_write_audit(watched: Path, report: Path) -> None:
    writes: list[str] = []
    watched = str(watched.resolve())

    def is_watched(path) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(watched)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in (mode or "") for c in "wax+") if mode else bool((flags or 0) & WRITE_FLAGS)
            if writing and is_watched(path):
                writes.append(f"open {os.fsdecode(path)}")
        elif event in WRITE_EVENTS and args and is_watched(args[-1] if event in ("os.rename", "os.replace") else args[0]):
            writes.append(f"{event} {os.fsdecode(args[0])}")

    sys.addaudithook(hook)
    atexit.register(lambda: report.write_text(json.dumps(writes)))


def fail_at_step(step: int) -> None:
    import kernel.train as train_module
    original, calls = train_module.train_step, []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise RuntimeError(f"injected failure in rank {os.environ['RANK']} at step {step}")
        return original(*args, **kwargs)

    train_module.train_step = failing_step


def main() -> int:
    options = json.loads(sys.argv[1])
    argv = sys.argv[sys.argv.index("--") + 1:]
    rank = int(os.environ["RANK"])
    if options.get("audit"):
        out = Path(argv[argv.index("--out") + 1])
        install_write_audit(out, Path(options["audit"]) / f"rank{rank}.json")
    if options.get("fail_rank") == rank:
        fail_at_step(options["fail_at_step"])
    if options.get("step_clock"):
        import functools
        import kernel.main as main_module
        from tests.conftest import StepClock
        clock = StepClock(options["step_clock"]).install(setattr)
        main_module.run = functools.partial(main_module.run, now=clock)
    from kernel.cli import cli
    return cli(argv)


if __name__ == "__main__":
    raise SystemExit(main())
