"""Exit codes shared by the worker, the driver and every launcher."""

# The job checkpointed because it was asked to stop (preemption, Slurm's
# pre-timeout signal): launchers treat it as "requeue me". EX_TEMPFAIL.
PREEMPTED = 75
# The user must fix the job file or the data.
USER_ERROR = 2


def for_status(status: str) -> int:
    """Process exit code for a run's final ``status`` ("rejected": refused before it started)."""
    return {"completed": 0, "preempted": PREEMPTED, "rejected": USER_ERROR}.get(status, 1)
