"""Exit codes shared by the worker, the driver and every launcher."""

# The job checkpointed because it was asked to stop (preemption, Slurm's
# pre-timeout signal): launchers treat it as "requeue me". EX_TEMPFAIL.
PREEMPTED = 75
# The user must fix the job file or the data.
USER_ERROR = 2


def for_status(status: str) -> int:
    """Process exit code for a run's final ``status`` ("rejected": refused before it started)."""
    return {"completed": 0, "preempted": PREEMPTED, "rejected": USER_ERROR}.get(status, 1)


def status_of(code: int) -> str:
    """The run's ``status`` for a worker program's exit code (2 and 1 are both a failed run)."""
    return {0: "completed", PREEMPTED: "preempted"}.get(code, "failed")
