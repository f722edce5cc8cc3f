"""What every command shares: the consoles, argument types, loading and checking a job."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console

from sft_cluster import exitcodes
from sft_cluster.spec import (
    ClusterSpec,
    JobSpec,
    SpecError,
    check_local_paths,
    load_cluster,
    load_job,
    validate_pair,
)

if TYPE_CHECKING:
    from sft_cluster.launch import Request

console = Console()
errors = Console(stderr=True)

JobArg = Annotated[Path, typer.Argument(help="Job file (YAML).", show_default=False)]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Overrides as KEY=VALUE, e.g. train.max_steps=40.")
]
ClusterOpt = Annotated[
    Path | None, typer.Option("--cluster", "-c", help="Cluster file (YAML); default: local.")
]


def fail(lines: list[str]) -> NoReturn:
    for line in lines:
        errors.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(exitcodes.USER_ERROR)


def load_checked(
    job_path: Path, overrides: list[str] | None, cluster_path: Path | None
) -> tuple[JobSpec, ClusterSpec]:
    """Everything a command needs to know is right before it does anything else."""
    try:
        job = load_job(job_path, overrides or [])
        cluster = load_cluster(cluster_path)
    except SpecError as exc:
        fail(exc.problems)
    problems = [f"{job_path}: {p}" for p in check_local_paths(job)]
    if problems:
        fail(problems)
    for warning in validate_pair(job, cluster):
        errors.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    return job, cluster


def show(request: Request) -> None:
    """A dry run: print the request as its backend renders it, each part on its stream."""
    for part in request.dry_run():
        out = errors if part.stderr else console
        if part.verbatim:
            out.print(part.text, highlight=False, markup=False, soft_wrap=True)
        else:
            out.print(part.text, highlight=False)


def check_data(job_path: Path, job: JobSpec) -> None:
    from sft_cluster.data import check_sources

    problems = check_sources(job.data, job.storage)
    if problems:
        fail([f"{job_path}: {p}" for p in problems])


def check_start_or_exit(job: JobSpec) -> None:
    """Refuse, before any cluster starts, a start that would mix with or repeat another run,
    or that would train nothing (a chat template without an assistant mask, untrained sources)."""
    from sft_cluster.data import DataError
    from sft_cluster.driver.claim import RunComplete, RunRefused, check_start, check_trainable

    try:
        check_start(job)
        check_trainable(job)
    except (RunRefused, DataError) as exc:
        fail([str(exc)])
    except RunComplete as exc:
        console.print(str(exc), highlight=False, soft_wrap=True)
        raise typer.Exit(0) from None
