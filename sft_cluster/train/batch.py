"""The split of the global batch: micro batch x accumulation x workers, the same product at any world size.

The global batch is ``train.global_batch_size`` when set, else what the run
started with (micro x accumulation x its first world size). A resume on
another number of workers keeps it: accumulation adjusts, and with
``train.global_batch_size`` the micro batch too (the job's
``micro_batch_size`` is then the largest it may be). When no split fits,
the refusal lists the ones that would.
"""

from __future__ import annotations

from dataclasses import dataclass

from sft_cluster.data import DataError
from sft_cluster.spec import JobSpec

__all__ = ["BatchSplit", "batch_split", "global_batch", "with_split"]


@dataclass(frozen=True)
class BatchSplit:
    micro: int
    accum: int
    world_size: int

    @property
    def rows(self) -> int:
        """Rows per optimizer step over all workers."""
        return self.micro * self.accum * self.world_size

    def describe(self) -> str:
        parts = f"micro batch {self.micro} x accumulation {self.accum} x {self.world_size} workers"
        return f"{self.rows} rows = {parts}"


def global_batch(job: JobSpec, first_world_size: int) -> int:
    """Rows per optimizer step over all workers, for a run that started on ``first_world_size``."""
    train = job.train
    return train.global_batch_size or train.micro_batch_size * train.grad_accum_steps * first_world_size


def _world_sizes(rows: int, micro: int | None, limit: int = 64) -> list[int]:
    """World sizes up to ``limit`` a global batch of ``rows`` splits over (with this micro batch)."""
    return [w for w in range(1, limit + 1) if rows % w == 0 and (micro is None or rows // w % micro == 0)]


def batch_split(job: JobSpec, world_size: int, first_world_size: int) -> BatchSplit:
    """The split for ``world_size`` workers; DataError naming the fixes when none fits."""
    train = job.train
    rows, fixed = global_batch(job, first_world_size), train.global_batch_size is not None
    per_rank, left = divmod(rows, world_size)
    if fixed:
        if left:
            raise DataError(
                f"train.global_batch_size = {rows} does not split over {world_size} workers; "
                f"set resources.num_workers to one of {', '.join(map(str, _world_sizes(rows, None)))}"
            )
        micro = max(m for m in range(1, min(train.micro_batch_size, per_rank) + 1) if per_rank % m == 0)
        return BatchSplit(micro, per_rank // micro, world_size)
    if left or per_rank % train.micro_batch_size:
        fits = _world_sizes(rows, train.micro_batch_size)
        follow = _world_sizes(rows, None)
        raise DataError(
            f"the run's global batch is {rows} rows (train.micro_batch_size {train.micro_batch_size} x "
            f"train.grad_accum_steps {train.grad_accum_steps} x {first_world_size} workers), which does not "
            f"split over {world_size} workers at micro batch {train.micro_batch_size}: set "
            f"resources.num_workers to one of {', '.join(map(str, fits))}, or train.global_batch_size={rows} "
            f"to let the micro batch follow (then any of {', '.join(map(str, follow))})"
        )
    return BatchSplit(train.micro_batch_size, per_rank // train.micro_batch_size, world_size)


def misfits(job: JobSpec, sizes: range) -> list[int]:
    """The world sizes in ``sizes`` that ``train.global_batch_size`` does not split over."""
    rows = job.train.global_batch_size or 0
    return [size for size in sizes if rows % size]


def with_split(job: JobSpec, split: BatchSplit) -> JobSpec:
    """``job`` as the workers train it: its micro batch and accumulation from ``split``."""
    train = job.train.model_copy(update={"micro_batch_size": split.micro, "grad_accum_steps": split.accum})
    return job.model_copy(update={"train": train})
