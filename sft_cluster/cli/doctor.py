"""``sft-cluster doctor``: every check before a submission, with pass/fail and the fix (exit 2 on a fail)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from sft_cluster import exitcodes
from sft_cluster.cli.app import app
from sft_cluster.cli.common import ClusterOpt, JobArg, OverridesArg, console, errors, load_checked

if TYPE_CHECKING:
    from sft_cluster.launch.doctor import Check


def _print_checks(checks: Iterable[Check]) -> list[Check]:
    """Print each check as it finishes (the slow ones come last); return the failed ones."""
    failed = []
    for check in checks:
        mark = "[green]ok  [/green]" if check.ok else "[red]FAIL[/red]"
        console.print(f"{mark} {check.name:10} {check.detail}", highlight=False, soft_wrap=True)
        if not check.ok:
            failed.append(check)
            if check.fix:
                console.print(f"     {'':10} fix: {check.fix}", highlight=False, soft_wrap=True)
    return failed


@app.command()
def doctor(job_path: JobArg, overrides: OverridesArg = None, cluster: ClusterOpt = None) -> None:
    """Check, before submitting, that the job can run on the cluster: the job file, the cluster,
    versions, resources, the output folder, the data and the staging space."""
    from sft_cluster.launch import get_backend
    from sft_cluster.launch.probes import diagnose

    started = time.monotonic()
    job, cluster_spec = load_checked(job_path, overrides, cluster)  # exit 2 with the field and its fix
    console.print(f"[green]ok  [/green] {'job':10} {job_path}: job '{job.name}' is valid", highlight=False)
    backend = get_backend(cluster_spec, str(cluster or Path("local")))
    failed = _print_checks(diagnose(backend, job, deep=True))
    took = time.monotonic() - started
    if failed:
        errors.print(f"{len(failed)} check(s) failed ({took:.1f} s)", highlight=False)
        raise typer.Exit(exitcodes.USER_ERROR)
    console.print(f"every check passed ({took:.1f} s)", highlight=False)
