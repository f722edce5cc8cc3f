"""One backend per target; nothing about the target leaks below this package."""

from __future__ import annotations

from typing import Any

from sft_cluster.launch.base import Backend, JobState, LaunchError, Printed, Request, Submission
from sft_cluster.spec import ClusterSpec


def get_backend(cluster: ClusterSpec, cluster_file: str) -> Backend[Any]:
    """The backend for a cluster file's ``kind``: ``local``, ``ray`` or ``slurm``."""
    if cluster.kind == "ray":
        from sft_cluster.launch.ray_jobs import RayJobsBackend

        return RayJobsBackend(cluster, cluster_file)
    if cluster.kind == "slurm":
        from sft_cluster.launch.slurm import SlurmBackend

        return SlurmBackend(cluster, cluster_file)
    from sft_cluster.launch.local import LocalBackend

    return LocalBackend(cluster, cluster_file)


__all__ = [
    "Backend",
    "JobState",
    "LaunchError",
    "Printed",
    "Request",
    "Submission",
    "get_backend",
]
