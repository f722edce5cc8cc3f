"""The driver's three steps, the same for every executor: ``prepare``, execute, ``finish``.

``prepare`` claims the run directory (see ``claim``: refusals, the data plan, ``job.yaml``,
``run.json``) and clears what an earlier attempt left that must not speak for this one (worker
reports, a stale stop request). The executor starts the workers, which read what was prepared.
``finish`` writes ``summary.json`` and ``loss.png``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from rich.console import Console

from sft_cluster import storage
from sft_cluster.data import DataError
from sft_cluster.driver.claim import RunComplete, RunRefused, RunStart, claim_run
from sft_cluster.driver.stopfile import StopFile
from sft_cluster.spec import JobSpec
from sft_cluster.tracking import RunDir, finalize_run, run_dir_of
from sft_cluster.train.batch import with_split


@dataclass
class Prepared:
    """A claimed run, ready for its workers; ``job`` is what they train (with the batch split)."""

    job: JobSpec
    run: RunDir
    start: RunStart
    stop_file: StopFile
    started_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Outcome:
    """How the workers ended: ``status`` as ``summary.json`` says it, and why when it failed."""

    status: str  # "completed", "preempted" or "failed"
    error: str | None = None


class Executor(Protocol):
    """Starts the workers of a prepared run and waits for them."""

    name: str

    def world(self, job: JobSpec) -> tuple[int, int]:
        """(world size, how many nodes may run the workers), for the claim."""

    def execute(self, prepared: Prepared, console: Console) -> Outcome: ...


def prepare(
    job: JobSpec, world_size: int, nodes: int, notify: Callable[[str], None], started_at: float | None = None
) -> Prepared:
    """Claim the run; raises RunRefused, DataError (nothing written) or RunComplete (nothing to do)."""
    start = claim_run(job, world_size, notify, nodes=nodes)
    run = run_dir_of(job)
    run.clear_worker_reports()
    stop_file = StopFile(run, start.run_id)
    stop_file.clear(only_stale=True)
    return Prepared(with_split(job, start.split), run, start, stop_file, started_at or time.time())


def finish(prepared: Prepared, outcome: Outcome, launcher: str) -> dict[str, Any]:
    """``summary.json`` and ``loss.png`` from what the workers left; the stop request is spent."""
    prepared.stop_file.clear()  # honoured (or too late): a later resume must not stop at once
    job = prepared.job
    return finalize_run(
        prepared.run,
        name=job.name,
        status=outcome.status,
        started_at=prepared.started_at,
        error=outcome.error,
        extra={"strategy": job.strategy.kind, "launcher": launcher},
    )


def completed_summary(job: JobSpec) -> dict[str, Any]:
    """What a run that already completed left (its summary), for a start that had nothing to do."""
    run = run_dir_of(job)
    if storage.exists(run.summary, run.options):
        return run.read_json(run.summary)
    return {"name": job.name, "status": "completed", "output_uri": run.uri}


def drive(
    job: JobSpec, executor: Executor, console: Console, started_at: float | None = None
) -> dict[str, Any]:
    """Prepare, execute, finish; returns the summary (``status: rejected`` when refused)."""
    try:
        world_size, nodes = executor.world(job)
        prepared = prepare(
            job,
            world_size,
            nodes,
            lambda message: console.print(message, highlight=False, soft_wrap=True),
            started_at,
        )
    except (DataError, RunRefused) as exc:
        # Refused before anything was written: the run directory is as it was.
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return {"name": job.name, "status": "rejected", "error": str(exc), "output_uri": job.output_uri}
    except RunComplete as exc:
        console.print(str(exc), highlight=False, soft_wrap=True)
        return completed_summary(job)
    return finish(prepared, executor.execute(prepared, console), executor.name)
