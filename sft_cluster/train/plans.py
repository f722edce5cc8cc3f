"""The data plans a rank trains and evaluates on: made or read once, on rank 0, for every rank.

The training plan was written by the driver when it prepared the run (``plan.json`` and its
sections, before any worker started); a worker reads only the header and its own section.
``data.eval`` sources are planned at the first evaluation.
"""

from __future__ import annotations

from collections.abc import Callable

from sft_cluster import storage
from sft_cluster.data import DataError, ShardPlan, list_sources, make_plan
from sft_cluster.data.evalset import eval_data
from sft_cluster.spec import JobSpec
from sft_cluster.tracking import run_dir_of
from sft_cluster.train import collectives


def text_from_rank0(rank: int, make: Callable[[], str]) -> str:
    """Rank 0 makes (or reads) a text, once for the world; every rank gets the same one.

    When rank 0 fails, every rank raises (a DataError as a DataError), so none waits for it.
    """
    outcome: tuple[str, str] | None = None
    failure: Exception | None = None
    if rank == 0:
        try:
            outcome = ("text", make())
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
    return text


def plan_from_rank0(rank: int, make: Callable[[], ShardPlan]) -> ShardPlan:
    """A whole plan made (or read) by rank 0, for every rank: small ones only (evaluation)."""
    return ShardPlan.from_json(text_from_rank0(rank, lambda: make().to_json()))


def _read_header(job: JobSpec) -> str:
    run = run_dir_of(job)
    try:
        return storage.read_text(run.plan, run.options)
    except Exception as exc:  # missing or unreadable: the same answer
        raise DataError(
            f"the run was not prepared by the driver: its data plan {run.plan} cannot be read "
            f"({type(exc).__name__}: {exc}); start it with sft-cluster (run, a Ray job or a Slurm "
            "template), not the worker alone"
        ) from exc


def prepared_plan(job: JobSpec, rank: int) -> ShardPlan:
    """This rank's view of the run's training plan, as the driver wrote it: rank 0 reads the header
    and shares it, each rank reads its own section. A DataError on every rank when one cannot."""
    header = text_from_rank0(rank, lambda: _read_header(job))
    plan: ShardPlan | None = None
    failure: Exception | None = None
    try:
        plan = run_dir_of(job).load_plan(header, rank=rank)
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
        failure = exc
    if not collectives.all_true(failure is None):
        if failure is not None:
            raise DataError(f"rank {rank} cannot read its part of the data plan: {failure}") from failure
        raise DataError("another rank cannot read its part of the data plan (its log says why)")
    assert plan is not None
    return plan


def eval_plan(job: JobSpec, rank: int, world_size: int) -> ShardPlan:
    """A plan of the ``data.eval`` sources, listed and made on rank 0."""
    held_out = eval_data(job.data)
    return plan_from_rank0(
        rank, lambda: make_plan(held_out, list_sources(held_out, job.storage), world_size, job.train.seed)
    )
