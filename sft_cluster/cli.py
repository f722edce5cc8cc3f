"""``sft-cluster``: parse, validate, hand the job to a backend, print the outcome."""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sft_cluster import exitcodes
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
    raise typer.Exit(exitcodes.USER_ERROR)


def load_checked(
    job_path: Path, overrides: list[str] | None, cluster_path: Path | None
) -> tuple[JobSpec, ClusterSpec]:
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


def _strategy_json(job: JobSpec) -> str:
    """The generated accelerate/DeepSpeed settings, as the run will write them to strategy.json."""
    from sft_cluster.train.strategy import describe_strategy

    return "# strategy.json (generated from the job's strategy section)\n" + json.dumps(
        describe_strategy(job), indent=2, sort_keys=True
    )


def _check_data(job_path: Path, job: JobSpec) -> None:
    from sft_cluster.data import check_sources
    from sft_cluster.data.evalset import eval_data

    problems = check_sources(job.data, job.storage)
    if job.data.eval:
        problems += [
            p.replace("data.sources[", "data.eval[") for p in check_sources(eval_data(job.data), job.storage)
        ]
    if problems:
        _fail([f"{job_path}: {p}" for p in problems])


@app.command()
def validate(
    job_path: JobArg,
    overrides: OverridesArg = None,
    cluster: ClusterOpt = None,
    check_data: Annotated[bool, typer.Option("--check-data", help="Also list remote data sources.")] = False,
) -> None:
    """Check a job (and cluster) file; print every problem with its field and fix."""
    job, _ = load_checked(job_path, overrides, cluster)
    if check_data:
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
    _run_here(job_path, overrides, cluster, dry_run)


def _run_here(
    job_path: Path,
    overrides: list[str] | None,
    cluster: Path | None,
    dry_run: bool,
    verify_fast: bool = False,
) -> None:
    from sft_cluster.launch.local import anchor_local_paths, describe_local, run_local
    from sft_cluster.spec import LocalCluster

    job, cluster_spec = load_checked(job_path, overrides, cluster)
    if not isinstance(cluster_spec, LocalCluster):
        _fail(
            [
                f"{cluster}: 'run' needs a cluster of kind 'local', got '{cluster_spec.kind}' "
                "(use 'submit' for Ray or 'sbatch' for Slurm)"
            ]
        )
    job = anchor_local_paths(job)
    _check_data(job_path, job)
    if dry_run:
        console.print(dump_job_yaml(job), highlight=False)
        console.print(json.dumps(describe_local(job, cluster_spec), indent=2), highlight=False)
        console.print(_strategy_json(job), highlight=False)
        return
    summary = run_local(job, cluster_spec, console, verify_fast=verify_fast)
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
) -> None:
    """Continue a run from its newest complete checkpoint (here, or with --cluster on Ray/Slurm)."""
    import tempfile

    from sft_cluster import storage

    job_uri = storage.join(run_uri, "job.yaml")
    try:
        text = storage.read_text(job_uri)
    except FileNotFoundError:
        _fail([f"{run_uri}: no job.yaml here; is this a run directory (output_uri)?"])
    try:
        spec = load_cluster(cluster) if cluster else None
    except SpecError as exc:
        _fail(exc.problems)
    pinned = [*(overrides or []), f"output_uri={run_uri}", "checkpoint.resume=auto"]
    with tempfile.TemporaryDirectory(prefix="sftc-resume-") as folder:
        job_path = Path(folder) / "job.yaml"  # the run's own job, read by the usual loader
        job_path.write_text(text)
        if spec is None or spec.kind == "local":
            _run_here(job_path, pinned, cluster, dry_run=False, verify_fast=fast)
        else:
            _remote(job_path, pinned, cluster, spec.kind, dry_run=False)


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


def _remote(job_path: Path, overrides: list[str] | None, cluster: Path | None, kind: str, dry_run: bool):
    from sft_cluster.launch import LaunchError, get_backend, registry

    if cluster is None:
        _fail([f"--cluster is required: a cluster file of kind '{kind}' (see cluster_configs/)"])
    job, cluster_spec = load_checked(job_path, overrides, cluster)
    if cluster_spec.kind != kind:
        verb = {"ray": "submit", "slurm": "sbatch", "local": "run"}[cluster_spec.kind]
        _fail([f"{cluster}: kind is '{cluster_spec.kind}', not '{kind}' (use 'sft-cluster {verb}')"])
    try:
        outcome = get_backend(cluster_spec, str(cluster)).submit(job, dry_run=dry_run)
    except LaunchError as exc:
        _fail([str(exc)])
    if isinstance(outcome, str):
        console.print(outcome, highlight=False, markup=False, soft_wrap=True)
        # On stderr, so the printed script or entrypoint can be piped as it is.
        errors.print(_strategy_json(job), highlight=False)
        return
    registry.remember(outcome)
    console.print(f"submitted [bold]{outcome.id}[/bold]  output_uri: {outcome.output_uri}")
    return outcome


DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print what would be submitted; submit nothing.")]


@app.command()
def submit(
    job_path: JobArg,
    overrides: OverridesArg = None,
    cluster: ClusterOpt = None,
    dry_run: DryRunOpt = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream logs until the job ends.")] = False,
) -> None:
    """Submit to a Ray cluster as a Ray Job."""
    submission = _remote(job_path, overrides, cluster, "ray", dry_run)
    if submission is not None and follow:
        _follow_to_end(submission.id, cluster)


@app.command()
def sbatch(
    job_path: JobArg, overrides: OverridesArg = None, cluster: ClusterOpt = None, dry_run: DryRunOpt = False
) -> None:
    """Submit to Slurm with sbatch."""
    _remote(job_path, overrides, cluster, "slurm", dry_run)


IdArg = Annotated[str, typer.Argument(help="Job id printed by submit/sbatch.", show_default=False)]


def _backend_for(job_id: str | None, cluster: Path | None):
    """The backend that runs ``job_id``: from --cluster, else from the local registry."""
    from sft_cluster.launch import get_backend, registry

    if cluster is None and job_id is not None:
        known = registry.find(job_id)
        if known is None:
            _fail([f"unknown job id '{job_id}': not submitted from here; pass --cluster FILE"])
        cluster = Path(known.cluster_file)
    if cluster is None:
        _fail(["--cluster is required"])
    try:
        spec = load_cluster(cluster)
    except SpecError as exc:
        _fail(exc.problems)
    if spec.kind == "local":
        _fail([f"{cluster}: local runs have no job ids; look in the run directory instead"])
    return get_backend(spec, str(cluster))


def _call(fn, *args, **kwargs):
    from sft_cluster.launch import LaunchError

    try:
        return fn(*args, **kwargs)
    except LaunchError as exc:
        _fail([str(exc)])


def _follow_to_end(job_id: str, cluster: Path | None) -> None:
    """Stream the log, then exit as ``run`` would: 0 succeeded, 75 checkpointed and stopped, 1 failed."""
    from sft_cluster.launch import LaunchError

    backend = _backend_for(job_id, cluster)
    try:
        for line in backend.logs(job_id, follow=True):  # a failure can come mid-stream
            console.print(line, highlight=False, markup=False, end="", soft_wrap=True)
    except LaunchError as exc:
        _fail([str(exc)])
    final = _call(backend.status, job_id)
    if final.state == "PREEMPTED":
        line = f"job {job_id}: {final.state}  {final.message or ''}"
        console.print(line, highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(exitcodes.PREEMPTED)
    console.print(f"job {job_id}: {final.state}", highlight=False)
    if final.message and not final.succeeded:
        errors.print(final.message, highlight=False, markup=False, soft_wrap=True)
    if not final.succeeded:
        raise typer.Exit(1)


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


data_app = typer.Typer(help="Look at the training data as the model will see it.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _conversations_by_source(job: JobSpec):
    """(source uri, conversations) for each source, with data errors as user errors."""
    from sft_cluster.data import DataError, load_conversations

    try:
        for source in job.data.sources:
            single = job.data.model_copy(update={"sources": [source]})
            yield source.uri, load_conversations(single, job.storage)
    except DataError as exc:
        _fail([str(exc)])


@data_app.command("preview")
def data_preview(
    job_path: JobArg,
    overrides: OverridesArg = None,
    rank: Annotated[int, typer.Option(help="Show what this rank trains on.")] = 0,
    world_size: Annotated[int, typer.Option(help="Number of ranks the data is split over.")] = 1,
    n: Annotated[int, typer.Option("-n", help="How many samples.")] = 3,
) -> None:
    """Samples as the model sees them: the chat template applied, trained tokens highlighted.

    The samples are the first that ``--rank`` of ``--world-size`` reads under the
    run's shard plan (seeded by train.seed), in training order.
    """
    from rich.text import Text

    from sft_cluster.data import DataError, list_sources, make_plan
    from sft_cluster.data.stream import RankStream
    from sft_cluster.train.model import load_tokenizer

    job, _ = load_checked(job_path, overrides, None)
    if not 0 <= rank < world_size:
        _fail([f"--rank {rank} must be in 0..{world_size - 1}"])
    _check_data(job_path, job)
    tokenizer = load_tokenizer(job.model)
    try:
        plan = make_plan(job.data, list_sources(job.data, job.storage), world_size, job.train.seed)
        stream = RankStream(plan, rank, job.data, job.storage, tokenizer)
        samples = list(itertools.islice(stream, n))
    except DataError as exc:
        _fail([str(exc)])
    for index, sample in enumerate(samples):
        text = Text()
        for token, trained in zip(sample.input_ids, sample.assistant_mask, strict=True):
            text.append(tokenizer.decode([token]), style="bold green" if trained else "dim")
        console.rule(
            f"rank {rank}, sample {index}: {len(sample.input_ids)} tokens, "
            f"{sum(sample.assistant_mask)} trained (green)"
        )
        console.print(text)


@data_app.command("stats")
def data_stats(job_path: JobArg, overrides: OverridesArg = None) -> None:
    """Samples, tokens, over-length conversations and packing efficiency, per source."""
    from sft_cluster.data.inspect import SourceStats, tokenize
    from sft_cluster.train.model import load_tokenizer

    job, _ = load_checked(job_path, overrides, None)
    _check_data(job_path, job)
    tokenizer = load_tokenizer(job.model)
    max_len, policy = job.data.max_seq_len, job.data.truncation
    table = Table("source", "samples", "tokens", "trained", f"> {max_len} ({policy})", "packing efficiency")
    total = SourceStats()
    for uri, conversations in _conversations_by_source(job):
        stats = SourceStats()
        for conversation in conversations:
            ids, mask = tokenize(tokenizer, conversation)
            stats.add(ids, mask, max_len)
            total.add(ids, mask, max_len)
        table.add_row(
            uri,
            f"{stats.samples:,}",
            f"{stats.tokens:,}",
            f"{stats.trained_tokens:,}",
            f"{stats.over_length:,}",
            f"{stats.packing_efficiency(max_len, policy):.3f}",
        )
    table.add_row(
        "all",
        f"{total.samples:,}",
        f"{total.tokens:,}",
        f"{total.trained_tokens:,}",
        f"{total.over_length:,}",
        f"{total.packing_efficiency(max_len, policy):.3f}",
        style="bold",
    )
    console.print(table)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        errors.print("interrupted")
        sys.exit(130)
