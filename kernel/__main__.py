"""`python -m kernel`: the same program the notebook runs, from a shell or under torchrun."""

from kernel.cli import cli

raise SystemExit(cli())
