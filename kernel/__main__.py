"""`python -m kernel`: the same program the notebook runs, from a shell or under torchrun."""

import signal

from kernel.cli import cli

code = cli()
for stop in (signal.SIGTERM, signal.SIGINT):  # the work is over: a stop arriving while Python exits changes nothing
    signal.signal(stop, signal.SIG_IGN)
raise SystemExit(code)
