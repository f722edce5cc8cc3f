"""``sft-cluster report RUN_URI``: where a finished run's wall time went, and ``report.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sft_cluster.cli.app import app
from sft_cluster.cli.common import console, fail


@app.command()
def report(
    run_uri: Annotated[
        str, typer.Argument(help="Run directory (any URI: a folder, s3://, gs://).", show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the figure.")] = Path("report.png"),
    endpoint_url: Annotated[
        str | None, typer.Option("--endpoint-url", help="An S3-compatible server's address.")
    ] = None,
) -> None:
    """Goodput and the time split of a run (from its summary.json), and report.png: loss, eval loss,
    tokens/s and the time split."""
    from sft_cluster import storage
    from sft_cluster.tracking import RunDir, read_jsonl
    from sft_cluster.tracking.goodput import PARTS
    from sft_cluster.tracking.plot import plot_report

    run = RunDir(run_uri, storage.storage_options_for(run_uri, endpoint_url, {}))
    try:
        summary = run.read_json(run.summary) if storage.exists(run.summary, run.options) else None
        records = read_jsonl(run.metrics, run.options)
        events = [e for e in read_jsonl(run.events, run.options) if e.get("event") == "resumed"]
    except OSError as exc:  # unreachable storage, no permission
        fail([f"{run_uri}: {type(exc).__name__}: {exc}"])
    if summary is None and not records:
        fail([f"{run_uri}: no summary.json and no metrics.jsonl here; is this a run directory (output_uri)?"])
    split = summary.get("time_split") if summary else None
    title = (
        f"run '{summary['name']}': {summary['status']}" if summary else f"{run_uri}: running, no summary yet"
    )
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column(justify="right")
    if split is None:
        console.print(f"{title}; {len(records)} steps logged, the time split comes with the summary")
    else:
        wall = split["wall_seconds"]
        for part in PARTS:
            seconds = split[f"{part}_seconds"]
            table.add_row(
                part.replace("_", " "), f"{seconds:,.1f} s", f"{seconds / wall:.1%}" if wall else "-"
            )
        table.add_row("wall time", f"{wall:,.1f} s", "")
        table.add_row("goodput", f"{split['goodput']:.1%}" if split.get("goodput") is not None else "-", "")
        if events:
            table.add_row("restarts", str(len(events)), "")
        console.print(table)
    plot_report(records, split, str(out.absolute()), title)
    console.print(f"wrote {out}")
