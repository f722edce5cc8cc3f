"""The run's data plan and each rank's data cursor.

The plan is made once per run (``plan.json`` in the run directory) and
reused by every restart and resume, because the cursors saved in the
checkpoints only make sense for the plan they were made with. A fresh run
(no committed checkpoint) lists the sources again and plans anew.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sft_cluster import storage
from sft_cluster.data import DataError, ShardPlan, build_plan, list_sources, plan_changes
from sft_cluster.spec import JobSpec
from sft_cluster.tracking import run_dir_of


def cursor_file(rank: int) -> str:
    """Where rank ``rank`` keeps its data cursor inside a checkpoint folder."""
    return f"data-cursor/rank-{rank:05d}.json"


def read_cursor(checkpoint_dir: Path, rank: int) -> dict[str, Any]:
    path = checkpoint_dir / cursor_file(rank)
    if not path.exists():
        raise DataError(
            f"checkpoint {checkpoint_dir.name} has no data cursor for rank {rank} "
            "(written by another world size or an older version); resume with the world size "
            "the run started with, or start a new output_uri"
        )
    return json.loads(path.read_text())


def _fits(plan: ShardPlan, job: JobSpec, world_size: int) -> list[str]:
    """Why ``plan`` cannot serve this job (empty: it can)."""
    problems = []
    if plan.world_size != world_size:
        problems.append(
            f"the run was planned for {plan.world_size} ranks, this one has {world_size} "
            f"(set resources.num_workers={plan.world_size})"
        )
    if plan.seed != job.train.seed:
        problems.append(f"the run was planned with train.seed={plan.seed}, not {job.train.seed}")
    planned, named = [s.uri for s in plan.sources], [s.uri for s in job.data.sources]
    if planned != named:
        problems.append(f"the run was planned for data sources {planned}, the job names {named}")
    return problems


def ensure_plan(job: JobSpec, world_size: int, notify: Callable[[str], None], resuming: bool) -> ShardPlan:
    """The plan of this run: the saved one when resuming (warning if the listing changed), else a new one."""
    run = run_dir_of(job)
    if resuming and storage.exists(run.plan, run.options):
        plan = ShardPlan.from_json(storage.read_text(run.plan, run.options))
        problems = _fits(plan, job, world_size)
        if problems:
            raise DataError(
                "this run has committed checkpoints whose data cursors belong to its saved data plan "
                f"({run.plan}), but " + "; ".join(problems) + " (or use a new output_uri to start over)"
            )
        for change in plan_changes(plan, list_sources(job.data, job.storage)):
            notify(f"warning: {change}")
        return plan
    plan = build_plan(job.data, job.storage, world_size, job.train.seed)
    storage.write_text(run.plan, plan.to_json(), run.options)
    return plan
