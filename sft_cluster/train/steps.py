"""How many optimizer steps a run trains: ``train.max_steps``, or counted for ``train.epochs``.

Everything that needs the number (the Trainer's ``max_steps``, hence the
learning-rate schedule; the final checkpoint; the completion check; progress
and the epoch in metrics) takes it from ``resolve_steps`` or ``planned_steps``.

With ``train.epochs`` every rank counts the packed rows of one epoch of its
own share at the same time (``sft_cluster.data.epochs``: the ranks are the
parallelism), the counts meet in one all-gather, and rank 0 saves them in
``epochs.json`` beside ``plan.json``. A restart or resume with the same plan
and cursor settings reads them and does not count again; a changed
``train.epochs`` only changes the steps derived from the saved rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from sft_cluster import storage
from sft_cluster.data import DataError, ShardPlan
from sft_cluster.spec import JobSpec
from sft_cluster.tracking import JsonlLog, RunDir, run_dir_of
from sft_cluster.train.batch import global_batch

# Light at import (the CLI's completion check uses planned_steps); counting imports torch when it runs.

__all__ = ["TrainSteps", "epoch_steps", "planned_steps", "resolve_steps", "steps_from_rows", "target_text"]


@dataclass(frozen=True)
class TrainSteps:
    """The run's step count; ``steps_per_epoch`` only when it comes from ``train.epochs``."""

    max_steps: int
    steps_per_epoch: float | None = None

    def epoch(self, step: int) -> float | None:
        """The fractional epoch after ``step`` optimizer steps (None for a ``max_steps`` job)."""
        return None if self.steps_per_epoch is None else step / self.steps_per_epoch


def epoch_steps(rows_per_rank: Sequence[int], epochs: float, rows_per_step: int) -> int:
    """Optimizer steps for ``epochs``: floor(epochs x fewest rows of any rank / rows per step).

    The rank with the fewest rows bounds every rank, so all stop at the same
    step. ``epochs`` is taken as written (0.29 is 29/100, not the float just below it).
    """
    return math.floor(Fraction(str(epochs)) * min(rows_per_rank) / rows_per_step)


def steps_from_rows(job: JobSpec, rows_per_rank: list[int], global_rows: int) -> TrainSteps:
    """``train.epochs`` over the rows counted per rank (on the world size the run started on);
    ``global_rows``: rows per optimizer step over all workers. DataError when that is not one step."""
    per_step, fewest = global_rows // len(rows_per_rank), min(rows_per_rank)
    steps = epoch_steps(rows_per_rank, job.train.epochs, per_step)
    if steps < 1:
        raise DataError(
            f"train.epochs = {job.train.epochs:g} is not one optimizer step: an epoch of the smallest rank "
            f"share (rank {rows_per_rank.index(fewest)}) packs into {fewest} rows, and a step takes "
            f"{per_step} (train.micro_batch_size x train.grad_accum_steps); raise train.epochs, lower "
            "the batch, or use fewer resources.num_workers"
        )
    return TrainSteps(steps, fewest / per_step)


def target_text(job: JobSpec, steps: int) -> str:
    """How the job names its length, for messages: 'train.max_steps 40' or 'train.epochs 2 (40 steps)'."""
    if job.train.epochs is None:
        return f"train.max_steps {steps}"
    return f"train.epochs {job.train.epochs:g} ({steps} steps)"


def _count_key(plan: ShardPlan, settings: dict[str, Any]) -> dict[str, Any]:
    """What a saved count is valid for: the plan, the settings a data cursor depends on, the window."""
    from sft_cluster.data.epochs import WINDOW_ROWS
    from sft_cluster.train.settings import SPLIT_KEYS

    # The run's first plan: a re-plan (another world size or split) keeps the count and the steps.
    kept = {key: value for key, value in settings.items() if key not in SPLIT_KEYS}
    return {"plan": plan.origin, "settings": kept, "window_rows": WINDOW_ROWS}


def _saved_rows(run: RunDir, key: dict[str, Any] | None, plan_id: str | None = None) -> list[int] | None:
    """The rows per rank saved for ``key`` (or, with ``plan_id`` alone, for that plan); else None."""
    if not storage.exists(run.epoch_count, run.options):
        return None
    try:
        saved = run.read_json(run.epoch_count)
    except (ValueError, OSError):
        return None
    if key is not None and any(saved.get(name) != value for name, value in key.items()):
        return None
    if plan_id is not None and saved.get("plan") != plan_id:
        return None
    return [int(rows) for rows in saved["rows_per_rank"]]


def planned_steps(job: JobSpec) -> int | None:
    """The step count before any worker starts: ``max_steps``, or from a count saved for the run's
    plan (None: not counted yet). For the driver's completion check."""
    if job.train.max_steps is not None:
        return job.train.max_steps
    run = run_dir_of(job)
    if not storage.exists(run.plan, run.options):
        return None
    plan = run.load_plan(body=False)
    rows = _saved_rows(run, None, plan_id=plan.origin)
    if rows is None or len(rows) != plan.first_world_size:
        return None
    try:
        return steps_from_rows(job, rows, global_batch(job, plan.first_world_size)).max_steps
    except DataError:
        return None


def _count_here(job: JobSpec, plan: ShardPlan, rank: int, encoder: Any) -> tuple[int, str | None, float]:
    """(rows, error, seconds) of this rank's count; a data error is returned so every rank raises it."""
    from sft_cluster.data.epochs import count_rows
    from sft_cluster.data.evalset import train_filter

    started = time.perf_counter()
    try:
        rows = count_rows(plan, rank, job.data, job.storage, encoder, keep=train_filter(job.data))
    except DataError as exc:
        return 0, str(exc), time.perf_counter() - started
    return rows, None, time.perf_counter() - started


def resolve_steps(
    job: JobSpec, plan: ShardPlan, encoder: Any, settings: dict[str, Any], notify: Callable[[str], None]
) -> TrainSteps:
    """This run's steps, the same on every rank (collective: every rank calls it).

    ``encoder``: what the trainer's stream gets; ``settings``: the cursor
    settings of the run (a count is reused only for the same ones).
    ``notify`` is called on rank 0 only.
    """
    from sft_cluster.train import collectives

    if job.train.max_steps is not None:
        return TrainSteps(job.train.max_steps)
    rank, world_size = collectives.rank_and_world()
    global_rows = job.train.micro_batch_size * job.train.grad_accum_steps * world_size
    run = run_dir_of(job)
    key = _count_key(plan, {**settings, "data.assistant_only_loss": job.data.assistant_only_loss})
    rows = collectives.broadcast_from_rank0(_saved_rows(run, key) if rank == 0 else None)
    if rows is not None:
        steps = steps_from_rows(job, rows, global_rows)
        if rank == 0:
            notify(
                f"train.epochs = {job.train.epochs:g}: {steps.max_steps} steps "
                f"({steps.steps_per_epoch:.2f} per epoch), from the rows counted for this plan "
                f"({run.epoch_count}); not counting again"
            )
        return steps
    if rank == 0:
        notify(
            f"train.epochs = {job.train.epochs:g}: counting the packed rows of one epoch "
            f"({world_size} rank(s), each its own share, in parallel)"
        )
    results = collectives.gather_objects(_count_here(job, plan, rank, encoder))
    errors = [(r, error) for r, (_, error, _) in enumerate(results) if error]
    if errors:
        raise DataError(f"counting train.epochs on rank {errors[0][0]}: {errors[0][1]}")
    rows = [count for count, _, _ in results]
    seconds = max(took for _, _, took in results)
    if rank == 0:  # saved first: a restart after a refusal below reads it too
        run.write_json(
            run.epoch_count,
            {**key, "rows_per_rank": rows, "seconds": round(seconds, 3), "counted_at": time.time()},
        )
        events = JsonlLog(run.events, run.options)
        events.append(
            {
                "event": "epochs_counted",
                "rows_per_rank": rows,
                "seconds": round(seconds, 3),
                "time": time.time(),
            }
        )
        events.close()
    steps = steps_from_rows(job, rows, global_rows)
    if rank == 0:
        fewest, most = min(rows), max(rows)
        spread = f"{fewest:,}" if fewest == most else f"{fewest:,} (rank {rows.index(fewest)}) to {most:,}"
        notify(
            f"train.epochs = {job.train.epochs:g}: an epoch packs into {spread} rows per rank (counted in "
            f"{seconds:.2f} s, ranks in parallel); the fewest bound every rank: "
            f"{steps.steps_per_epoch:.2f} steps per epoch, {steps.max_steps} steps"
        )
    return steps
