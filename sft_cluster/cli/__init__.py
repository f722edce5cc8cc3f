"""``sft-cluster``: parse, validate, hand the job to a backend, print the outcome.

``app`` is the typer app; each module here registers its commands on it.
"""

# Imported in the order `sft-cluster --help` lists them; each registers its commands on `app`.
from sft_cluster.cli import local, remote, data, doctor, report  # noqa: F401, I001
from sft_cluster.cli.app import app, main

__all__ = ["app", "main"]
