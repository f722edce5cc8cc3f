"""One backend per target; nothing about the target leaks below this package."""

from __future__ import annotations

from sft_cluster.launch.base import (
    PREEMPTED_EXIT_CODE,
    Backend,
    JobState,
    LaunchError,
    Submission,
)
from sft_cluster.spec import ClusterSpec


def get_backend(cluster: ClusterSpec, cluster_file: str) -> Backend:
    """The backend for a remote cluster file (``kind: ray`` or ``kind: slurm``)."""
    if cluster.kind == "ray":
        from sft_cluster.launch.ray_jobs import RayJobsBackend

        return RayJobsBackend(cluster, cluster_file)
    if cluster.kind == "slurm":
        from sft_cluster.launch.slurm import SlurmBackend

        return SlurmBackend(cluster, cluster_file)
    raise LaunchError(f"cluster kind '{cluster.kind}' has no remote backend; use 'sft-cluster run'")


__all__ = [
    "PREEMPTED_EXIT_CODE",
    "Backend",
    "JobState",
    "LaunchError",
    "Submission",
    "get_backend",
]
