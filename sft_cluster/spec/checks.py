"""Checks that look outside the file: local paths that must exist, job/cluster fit."""

from __future__ import annotations

import glob
from pathlib import Path

from sft_cluster.spec.cluster import ClusterSpec, RayCluster, SlurmCluster
from sft_cluster.spec.job import JobSpec
from sft_cluster.spec.loader import resolve_builtin


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~", "builtin:")) or value.endswith("/")


def _local(value: str) -> Path:
    if value.startswith("builtin:"):
        return Path(resolve_builtin(value))
    return Path(value.removeprefix("file://")).expanduser()


def check_local_paths(job: JobSpec) -> list[str]:
    """Problems with local model and data paths (remote URIs are checked by the data module)."""
    problems = []
    for field, value in (
        ("model.name_or_path", job.model.name_or_path),
        ("model.tokenizer", job.model.tokenizer),
    ):
        if value and _looks_like_path(value) and not _local(value).exists():
            problems.append(
                f"{field} = {value!r}: no such directory; give a local Hugging Face model "
                "folder, a hub name like 'Qwen/Qwen2.5-0.5B', or builtin:tiny-llama"
            )
    for index, source in enumerate(job.data.sources):
        if not _is_local(source.uri):
            continue
        path = _local(source.uri)
        if any(ch in str(path) for ch in "*?["):
            if not glob.glob(str(path)):
                problems.append(f"data.sources[{index}].uri = {source.uri!r}: the glob matches no file")
        elif not path.exists():
            problems.append(f"data.sources[{index}].uri = {source.uri!r}: no such file; check the path")
    return problems


def validate_pair(job: JobSpec, cluster: ClusterSpec) -> list[str]:
    """Warnings about a job on a cluster: not wrong, but likely to hurt."""
    warnings = []
    multi_node = (isinstance(cluster, RayCluster) and cluster.multi_node) or (
        isinstance(cluster, SlurmCluster) and (cluster.nodes or 1) > 1
    )
    if multi_node and _is_local(job.output_uri):
        warnings.append(
            f"output_uri = {job.output_uri!r} is a local path on a multi-node cluster: every node "
            "writes its own copy; use shared storage such as s3://bucket/runs/NAME"
        )
    return warnings
