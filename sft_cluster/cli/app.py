"""The ``sft-cluster`` typer app; commands register on it from the modules beside this one."""

from __future__ import annotations

import sys

import typer

from sft_cluster.cli.common import errors

app = typer.Typer(
    help="Supervised fine-tuning from one job file: locally, on Ray, or on Slurm.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        errors.print("interrupted")
        sys.exit(130)
