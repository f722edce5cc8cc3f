"""Commands for jobs on a cluster: ``submit``, ``sbatch``, ``status``, ``logs``, ``stop``, ``list``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from sft_cluster import exitcodes
from sft_cluster.cli.app import app
from sft_cluster.cli.common import (
    ClusterOpt,
    JobArg,
    OverridesArg,
    console,
    errors,
    fail,
    load_checked,
    show,
)
from sft_cluster.spec import SpecError, load_cluster

if TYPE_CHECKING:
    from sft_cluster.launch import Backend, Submission
    from sft_cluster.spec import JobSpec


def submit_or_dry_run(
    job_path: Path,
    overrides: list[str] | None,
    cluster: Path | None,
    kind: str,
    dry_run: bool,
    checks: bool = True,
) -> Submission | None:
    """``submit``/``sbatch``: the submission, remembered here; None for a dry run (printed)."""
    from sft_cluster.launch import LaunchError, get_backend, registry

    if cluster is None:
        fail([f"--cluster is required: a cluster file of kind '{kind}' (see cluster_configs/)"])
    job, cluster_spec = load_checked(job_path, overrides, cluster)
    if cluster_spec.kind != kind:
        verb = {"ray": "submit", "slurm": "sbatch", "local": "run"}[cluster_spec.kind]
        fail([f"{cluster}: kind is '{cluster_spec.kind}', not '{kind}' (use 'sft-cluster {verb}')"])
    backend = get_backend(cluster_spec, str(cluster))
    try:
        request = backend.plan(job)
        if dry_run:
            show(request)
            return None
        if checks:
            _check_before_sending(backend, job)
        submission = backend.launch(request)
    except LaunchError as exc:
        fail([str(exc)])
    registry.remember(submission)
    console.print(f"submitted [bold]{submission.id}[/bold]  output_uri: {submission.output_uri}")
    return submission


def _check_before_sending(backend: Backend, job: JobSpec) -> None:
    """``doctor``'s fast checks (the cluster answers, versions agree, the output folder takes a
    write): a submission that would fail on one of them is not sent (exit 2)."""
    from sft_cluster.launch.probes import diagnose

    failed = [check for check in diagnose(backend, job, deep=False) if not check.ok]
    if failed:
        lines = [f"{check.detail}" + (f" (fix: {check.fix})" if check.fix else "") for check in failed]
        fail([*lines, "nothing was submitted ('sft-cluster doctor' runs every check)"])


DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print what would be submitted; submit nothing.")]
ChecksOpt = Annotated[
    bool,
    typer.Option(
        "--checks/--no-checks",
        help="Before sending, check that the cluster answers, versions agree and output_uri takes a "
        "write from here (--no-checks: where only the cluster holds the output's credentials).",
    ),
]


@app.command()
def submit(
    job_path: JobArg,
    overrides: OverridesArg = None,
    cluster: ClusterOpt = None,
    dry_run: DryRunOpt = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream logs until the job ends.")] = False,
    checks: ChecksOpt = True,
) -> None:
    """Submit to a Ray cluster as a Ray Job."""
    submission = submit_or_dry_run(job_path, overrides, cluster, "ray", dry_run, checks)
    if submission is not None and follow:
        _follow_to_end(submission.id, cluster)


@app.command()
def sbatch(
    job_path: JobArg,
    overrides: OverridesArg = None,
    cluster: ClusterOpt = None,
    dry_run: DryRunOpt = False,
    checks: ChecksOpt = True,
) -> None:
    """Submit to Slurm with sbatch."""
    submit_or_dry_run(job_path, overrides, cluster, "slurm", dry_run, checks)


IdArg = Annotated[str, typer.Argument(help="Job id printed by submit/sbatch.", show_default=False)]


def _backend_for(job_id: str | None, cluster: Path | None) -> Backend:
    """The backend that runs ``job_id``: from --cluster, else from the local registry."""
    from sft_cluster.launch import get_backend, registry

    if cluster is None and job_id is not None:
        known = registry.find(job_id)
        if known is None:
            fail([f"unknown job id '{job_id}': not submitted from here; pass --cluster FILE"])
        cluster = Path(known.cluster_file)
    if cluster is None:
        fail(["--cluster is required"])
    try:
        spec = load_cluster(cluster)
    except SpecError as exc:
        fail(exc.problems)
    return get_backend(spec, str(cluster))


def _call(fn, *args, **kwargs):
    from sft_cluster.launch import LaunchError

    try:
        return fn(*args, **kwargs)
    except LaunchError as exc:
        fail([str(exc)])


def _follow_to_end(job_id: str, cluster: Path | None) -> None:
    """Stream the log, then exit as ``run`` would: 0 succeeded, 75 checkpointed and stopped, 2 refused
    (the job file or its run directory), 1 failed."""
    from sft_cluster.launch import LaunchError

    backend = _backend_for(job_id, cluster)
    try:
        for line in backend.logs(job_id, follow=True):  # a failure can come mid-stream
            console.print(line, highlight=False, markup=False, end="", soft_wrap=True)
    except LaunchError as exc:
        fail([str(exc)])
    final = _call(backend.status, job_id)
    if final.state == "PREEMPTED":
        line = f"job {job_id}: {final.state}  {final.message or ''}"
        console.print(line, highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(exitcodes.PREEMPTED)
    console.print(f"job {job_id}: {final.state}", highlight=False)
    if final.message and not final.succeeded:
        errors.print(final.message, highlight=False, markup=False, soft_wrap=True)
    if not final.succeeded:
        # A run refused before it started (exit 2: the job file or run directory) stays a user error.
        raise typer.Exit(exitcodes.USER_ERROR if final.exit_code == exitcodes.USER_ERROR else 1)


@app.command()
def status(job_id: IdArg, cluster: ClusterOpt = None) -> None:
    """State of a submitted job (Ray Job or Slurm job)."""
    state = _call(_backend_for(job_id, cluster).status, job_id)
    console.print(
        f"{state.id}  {state.state}" + (f"  {state.message}" if state.message else ""),
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


@app.command()
def logs(
    job_id: IdArg,
    cluster: ClusterOpt = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends.")
    ] = False,
) -> None:
    """Print a job's logs."""
    if follow:
        _follow_to_end(job_id, cluster)
        return
    for line in _call(_backend_for(job_id, cluster).logs, job_id, follow=False):
        console.print(line, highlight=False, markup=False, end="", soft_wrap=True)


@app.command()
def stop(
    job_id: IdArg,
    cluster: ClusterOpt = None,
    now: Annotated[
        bool, typer.Option("--now", help="End it at once: steps since the last checkpoint are lost.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the checkpoint and the end of the job.")
    ] = 600,
) -> None:
    """Stop a job: it checkpoints and ends (resume it later), or with --now ends at once."""
    console.print(f"stop requested for {job_id}" + (" (now)" if now else ": checkpointing, then ending"))
    final = _call(_backend_for(job_id, cluster).stop, job_id, now=now, wait_seconds=timeout)
    console.print(
        f"job {job_id}: {final.state}" + (f"  {final.message}" if final.message else ""),
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


@app.command("list")
def list_jobs(cluster: ClusterOpt = None) -> None:
    """Jobs on a cluster (with --cluster) or every job submitted from here."""
    import datetime

    from sft_cluster.launch import registry

    clusters = [cluster] if cluster else sorted({Path(s.cluster_file) for s in registry.submissions()})
    known = {s.id: s for s in registry.submissions()}
    table = Table("id", "job", "state", "start", "duration", "output_uri")

    def when(ts: float | None) -> str:
        return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"

    for path in clusters:
        for job in _call(_backend_for(None, path).list):
            mine = known.get(job.id)
            duration = f"{(job.end or time.time()) - job.start:.0f} s" if job.start else "-"
            table.add_row(
                job.id,
                job.name or (mine.name if mine else "-"),
                job.state,
                when(job.start),
                duration,
                job.output_uri or (mine.output_uri if mine else "-"),
            )
    console.print(table)
