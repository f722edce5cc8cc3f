"""Commands that run here: ``validate``, ``run`` and ``resume`` (here or on a cluster)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sft_cluster import exitcodes
from sft_cluster.cli.app import app
from sft_cluster.cli.common import (
    ClusterOpt,
    JobArg,
    OverridesArg,
    check_data,
    check_start_or_exit,
    console,
    fail,
    load_checked,
    show,
)
from sft_cluster.spec import SpecError, load_cluster


@app.command()
def validate(
    job_path: JobArg,
    overrides: OverridesArg = None,
    cluster: ClusterOpt = None,
    with_data: Annotated[bool, typer.Option("--check-data", help="Also list remote data sources.")] = False,
) -> None:
    """Check a job (and cluster) file; print every problem with its field and fix."""
    job, _ = load_checked(job_path, overrides, cluster)
    if with_data:
        check_data(job_path, job)
    console.print(f"[green]ok[/green] {job_path}: job '{job.name}' is valid")


@app.command()
def run(
    job_path: JobArg,
    overrides: OverridesArg = None,
    cluster: ClusterOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would run; run nothing.")] = False,
) -> None:
    """Train on this machine with an embedded Ray cluster."""
    _run_here(job_path, overrides, cluster, dry_run)


def _run_here(
    job_path: Path,
    overrides: list[str] | None,
    cluster: Path | None,
    dry_run: bool,
    verify_fast: bool = False,
) -> None:
    from sft_cluster.launch import get_backend

    job, cluster_spec = load_checked(job_path, overrides, cluster)
    if cluster_spec.kind != "local":
        fail(
            [
                f"{cluster}: 'run' needs a cluster of kind 'local', got '{cluster_spec.kind}' "
                "(use 'submit' for Ray or 'sbatch' for Slurm)"
            ]
        )
    backend = get_backend(cluster_spec, str(cluster or "local"))
    request = replace(backend.plan(job), verify_fast=verify_fast)
    check_data(job_path, request.job)
    check_start_or_exit(request.job)
    if dry_run:
        show(request)
        return
    summary = backend.launch(request).extra["summary"]
    if summary["status"] != "rejected":  # a refusal was printed, and nothing ran
        _print_summary(summary)
    raise typer.Exit(exitcodes.for_status(summary["status"]))


@app.command()
def resume(
    run_uri: Annotated[
        str, typer.Argument(help="Run directory (any URI) holding job.yaml.", show_default=False)
    ],
    overrides: OverridesArg = None,
    cluster: ClusterOpt = None,
    fast: Annotated[bool, typer.Option("--fast", help="Verify checkpoint sizes only, not hashes.")] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            help="Continue on this many workers: the data left is re-planned, the global batch kept.",
        ),
    ] = None,
) -> None:
    """Continue a run from its newest complete checkpoint (here, or with --cluster on Ray/Slurm)."""
    import tempfile

    from sft_cluster import storage

    job_uri = storage.join(run_uri, "job.yaml")
    try:
        text = storage.read_text(job_uri)
    except FileNotFoundError:
        fail([f"{run_uri}: no job.yaml here; is this a run directory (output_uri)?"])
    try:
        spec = load_cluster(cluster) if cluster else None
    except SpecError as exc:
        fail(exc.problems)
    pinned = [*(overrides or []), f"output_uri={run_uri}", "checkpoint.resume=auto"]
    if workers is not None:
        pinned.append(f"resources.num_workers={workers}")
    with tempfile.TemporaryDirectory(prefix="sftc-resume-") as folder:
        job_path = Path(folder) / "job.yaml"  # the run's own job, read by the usual loader
        job_path.write_text(text)
        if spec is None or spec.kind == "local":
            _run_here(job_path, pinned, cluster, dry_run=False, verify_fast=fast)
        else:
            from sft_cluster.cli.remote import submit_or_dry_run

            submit_or_dry_run(job_path, pinned, cluster, spec.kind, dry_run=False)


def _print_summary(summary: dict) -> None:
    table = Table(title=f"run '{summary['name']}': {summary['status']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()

    def fmt(value: object, spec: str = "") -> str:
        return "-" if value is None else format(value, spec)

    table.add_row("steps", fmt(summary["steps"]))
    if summary.get("epochs") is not None:  # train.epochs
        table.add_row("epochs", f"{summary['epochs']:g}")
    table.add_row("workers", f"{fmt(summary['world_size'])} on {', '.join(summary['nodes']) or '-'}")
    table.add_row("loss", f"{fmt(summary['first_loss'], '.4f')} -> {fmt(summary['final_loss'], '.4f')}")
    table.add_row("tokens/s", fmt(summary["tokens_per_second"], ",.0f"))
    table.add_row("first step after", f"{fmt(summary['time_to_first_step_seconds'], '.1f')} s")
    table.add_row("wall time", f"{summary['wall_seconds']:.1f} s")
    if summary.get("time_split"):
        from sft_cluster.tracking.goodput import describe_split

        table.add_row("goodput", describe_split(summary["time_split"]))
    table.add_row("restarts", str(summary["restarts"]))
    table.add_row("run directory", summary["output_uri"])
    if summary.get("final_model"):
        table.add_row("model", summary["final_model"])
    if summary.get("error"):
        table.add_row("error", f"[red]{summary['error']}[/red]")
    console.print(table)
