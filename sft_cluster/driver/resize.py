"""The data plan and batch split of a resume, on whatever number of workers it got.

Called by the driver's claim before any worker starts, and (elastic runs) by rank 0 at
every worker group's start, since Ray Train resizes the group inside ``fit()``.

A resume reads the newest commit's data cursors and the plan they name (kept
by id in ``plans/``: a later re-plan may have replaced ``plan.json`` before
crashing). On the world size and batch split they were written with, that
plan is the plan. On another world size, or another split of the same global
batch, ``sft_cluster.data.replan`` deals what is left to the new workers, and
the new plan records the change.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sft_cluster import storage
from sft_cluster.checkpoint.manifest import state_file
from sft_cluster.data import DataError, ShardPlan, build_plan
from sft_cluster.data.replan import replan
from sft_cluster.spec import JobSpec
from sft_cluster.tracking import RunDir, run_dir_of
from sft_cluster.train.batch import BatchSplit, batch_split, with_split
from sft_cluster.train.settings import DATA_CURSOR

__all__ = ["read_plan", "resume_plan", "workers_job"]


def read_plan(run: RunDir, body: bool = True) -> ShardPlan:
    """``plan.json``: the run's current plan (``body=False``: its header alone: seed, sources, history)."""
    return run.load_plan(body=body)


def _kept_plan(run: RunDir, plan_id: str) -> ShardPlan:
    """The run's plan named ``plan_id`` (DataError when it is not kept)."""
    uri = run.plan_by_id(plan_id)
    if not storage.exists(uri, run.options):
        raise DataError(f"the newest commit's data cursors are for plan {plan_id}, which {uri} does not hold")
    return run.load_plan(storage.read_text(uri, run.options))


def workers_job(job: JobSpec, world_size: int) -> JobSpec:
    """The job as the workers of a prepared run train it, for a node that did not prepare it."""
    plan = read_plan(run_dir_of(job), body=False)
    return with_split(job, batch_split(job, world_size, plan.first_world_size))


def _commit_cursors(run: RunDir) -> tuple[int, dict[str, Any], list[dict[str, Any]]] | None:
    """(step, manifest metadata, every rank's data cursor) of the newest commit (sizes checked)."""
    store = run.checkpoint_store()
    latest = store.latest(fast=True)
    if latest is None:
        return None
    metadata = latest.manifest.metadata
    fs, root = storage.filesystem(latest.uri, run.options)
    paths = [
        f"{root.rstrip('/')}/{state_file(DATA_CURSOR, r)}" for r in range(int(metadata.get("world_size", 1)))
    ]
    texts = fs.cat(paths)  # one batch: object stores fetch them concurrently
    return latest.step, metadata, [json.loads(texts[path]) for path in paths]


def _saved_split(metadata: dict[str, Any]) -> tuple[int, int, int]:
    settings = metadata.get("cursor_settings", {})
    return (
        int(settings.get("train.micro_batch_size", 0)),
        int(settings.get("train.grad_accum_steps", 0)),
        int(metadata.get("world_size", 0)),
    )


def resume_plan(
    job: JobSpec, run: RunDir, world_size: int, notify: Callable[[str], None]
) -> tuple[ShardPlan, BatchSplit]:
    """The plan and split this resume trains with: the newest commit's (its header alone where it
    stays the plan), or re-planned from it."""
    found = _commit_cursors(run)
    # The header alone unless the data is re-planned: the whole plan is large at scale (~100 MB
    # at 1M objects x 1,024 ranks), and the workers read their own sections of it.
    current = read_plan(run, body=False)
    kept = found is not None and found[2][0]["plan"] != current.id
    plan = _kept_plan(run, found[2][0]["plan"]) if kept else current
    if found is None:  # nothing trained yet that counts: plan afresh for this size
        if plan.world_size != world_size:
            notify(
                f"starting on {world_size} workers (planned for {plan.world_size}): planning the data again"
            )
            plan = build_plan(job.data, job.storage, world_size, job.train.seed)
            run.save_plan(plan)
        return plan, batch_split(job, world_size, plan.first_world_size)
    split = batch_split(job, world_size, plan.first_world_size)
    step, metadata, cursors = found
    if _saved_split(metadata) == (split.micro, split.accum, world_size):
        if kept:
            run.save_plan(plan)  # a re-plan that never committed is dropped
        return plan, split
    if not kept:
        plan = read_plan(run)
    new = replan(plan, cursors, job.data, world_size, step)
    run.save_plan(new)
    micro, accum, old_world = _saved_split(metadata)
    notify(
        f"resuming at step {step} on {world_size} workers (the checkpoint was written by {old_world}): "
        f"the data left of the epochs in progress is re-planned for {world_size} (plan {new.id}); "
        f"global batch {split.describe()}"
        + (
            f" (was micro batch {micro} x accumulation {accum})"
            if (micro, accum) != (split.micro, split.accum)
            else ""
        )
    )
    return new, split
