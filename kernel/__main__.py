"""`python -m kernel`: the same program the notebook runs, from a shell or under torchrun."""

from kernel.main import cli

raise SystemExit(cli())
