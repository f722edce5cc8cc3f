"""The data plans a rank trains and evaluates on: made or read once, on rank 0, for every rank.

The training plan was written by the driver when it prepared the run (``plan.json``, before any
worker started); the worker only reads it. ``data.eval`` sources are planned at the first evaluation.
"""

from __future__ import annotations

from collections.abc import Callable

from sft_cluster import storage
from sft_cluster.data import DataError, ShardPlan, list_sources, make_plan
from sft_cluster.data.evalset import eval_data
from sft_cluster.spec import JobSpec
from sft_cluster.tracking import run_dir_of
from sft_cluster.train import collectives


def plan_from_rank0(rank: int, make: Callable[[], ShardPlan]) -> ShardPlan:
    """Rank 0 makes (or reads) the plan, once for the world; every rank gets the same one.

    When rank 0 fails, every rank raises (a DataError as a DataError), so none waits for a plan.
    """
    outcome: tuple[str, str] | None = None
    failure: Exception | None = None
    if rank == 0:
        try:
            outcome = ("plan", make().to_json())
        except Exception as exc:  # every rank must hear of it, or the others wait forever
            failure = exc
            outcome = ("data" if isinstance(exc, DataError) else "error", str(exc))
    kind, text = collectives.broadcast_from_rank0(outcome)
    if failure is not None:
        raise failure
    if kind == "data":
        raise DataError(text)
    if kind == "error":
        raise RuntimeError(f"rank 0 could not make the data plan: {text}")
    return ShardPlan.from_json(text)


def _read_prepared(job: JobSpec) -> ShardPlan:
    run = run_dir_of(job)
    try:
        return ShardPlan.from_json(storage.read_text(run.plan, run.options))
    except Exception as exc:  # missing, unreadable or not a plan: the same answer
        raise DataError(
            f"the run was not prepared by the driver: its data plan {run.plan} cannot be read "
            f"({type(exc).__name__}: {exc}); start it with sft-cluster (run, a Ray job or a Slurm "
            "template), not the worker alone"
        ) from exc


def prepared_plan(job: JobSpec, rank: int) -> ShardPlan:
    """The run's training plan, as the driver wrote it; a DataError on every rank when it cannot be read."""
    return plan_from_rank0(rank, lambda: _read_prepared(job))


def eval_plan(job: JobSpec, rank: int, world_size: int) -> ShardPlan:
    """A plan of the ``data.eval`` sources, listed and made on rank 0."""
    held_out = eval_data(job.data)
    return plan_from_rank0(
        rank, lambda: make_plan(held_out, list_sources(held_out, job.storage), world_size, job.train.seed)
    )
