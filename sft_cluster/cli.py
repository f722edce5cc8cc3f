"""``sft-cluster``: parse, validate, hand the job to a backend, print the outcome."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sft_cluster.spec import (
    ClusterSpec,
    JobSpec,
    SpecError,
    check_local_paths,
    dump_job_yaml,
    load_cluster,
    load_job,
    validate_pair,
)

app = typer.Typer(
    help="Supervised fine-tuning from one job file: locally, on Ray, or on Slurm.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
errors = Console(stderr=True)

EXIT_USER_ERROR = 2

JobArg = Annotated[Path, typer.Argument(help="Job file (YAML).", show_default=False)]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Overrides as KEY=VALUE, e.g. train.max_steps=40.")
]
ClusterOpt = Annotated[
    Path | None, typer.Option("--cluster", "-c", help="Cluster file (YAML); default: local.")
]


def _fail(lines: list[str]) -> None:
    for line in lines:
        errors.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_USER_ERROR)


def load_checked(job_path: Path, overrides: list[str] | None, cluster_path: Path | None) -> tuple[JobSpec, ClusterSpec]:
    """Everything a command needs to know is right before it does anything else."""
    try:
        job = load_job(job_path, overrides or [])
        cluster = load_cluster(cluster_path)
    except SpecError as exc:
        _fail(exc.problems)
    problems = [f"{job_path}: {p}" for p in check_local_paths(job)]
    if problems:
        _fail(problems)
    for warning in validate_pair(job, cluster):
        errors.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    return job, cluster


def _check_data(job_path: Path, job: JobSpec) -> None:
    from sft_cluster.data import check_sources

    problems = check_sources(job.data, job.storage)
    if problems:
        _fail([f"{job_path}: {p}" for p in problems])


@app.command()
def validate(job_path: JobArg, overrides: OverridesArg = None, cluster: ClusterOpt = None) -> None:
    """Check a job (and cluster) file; print every problem with its field and fix."""
    job, _ = load_checked(job_path, overrides, cluster)
    _check_data(job_path, job)
    console.print(f"[green]ok[/green] {job_path}: job '{job.name}' is valid")


@app.command()
def run(
    job_path: JobArg,
    overrides: OverridesArg = None,
    cluster: ClusterOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would run; run nothing.")] = False,
) -> None:
    """Train on this machine with an embedded Ray cluster."""
    from sft_cluster.launch.local import anchor_local_paths, describe_local, run_local
    from sft_cluster.spec import LocalCluster

    job, cluster_spec = load_checked(job_path, overrides, cluster)
    if not isinstance(cluster_spec, LocalCluster):
        _fail([f"{cluster}: 'run' needs a cluster of kind 'local', got '{cluster_spec.kind}' "
               "(use 'submit' for Ray or 'sbatch' for Slurm)"])
    job = anchor_local_paths(job)
    _check_data(job_path, job)
    if dry_run:
        console.print(dump_job_yaml(job), highlight=False)
        console.print(json.dumps(describe_local(job, cluster_spec), indent=2), highlight=False)
        return
    summary = run_local(job, cluster_spec, console)
    _print_summary(summary)
    if summary["status"] != "completed":
        raise typer.Exit(1)


def _print_summary(summary: dict) -> None:
    table = Table(title=f"run '{summary['name']}': {summary['status']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()

    def fmt(value: object, spec: str = "") -> str:
        return "-" if value is None else format(value, spec)

    table.add_row("steps", fmt(summary["steps"]))
    table.add_row("workers", f"{fmt(summary['world_size'])} on {', '.join(summary['nodes']) or '-'}")
    table.add_row("loss", f"{fmt(summary['first_loss'], '.4f')} -> {fmt(summary['final_loss'], '.4f')}")
    table.add_row("tokens/s", fmt(summary["tokens_per_second"], ",.0f"))
    table.add_row("first step after", f"{fmt(summary['time_to_first_step_seconds'], '.1f')} s")
    table.add_row("wall time", f"{summary['wall_seconds']:.1f} s")
    table.add_row("restarts", str(summary["restarts"]))
    table.add_row("run directory", summary["output_uri"])
    if summary.get("final_model"):
        table.add_row("model", summary["final_model"])
    if summary.get("error"):
        table.add_row("error", f"[red]{summary['error']}[/red]")
    console.print(table)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        errors.print("interrupted")
        sys.exit(130)
