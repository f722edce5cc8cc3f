"""Checks that look outside the file: local paths that must exist, and job/cluster fit."""

from __future__ import annotations

import difflib
import glob
import re
from pathlib import Path

from sft_cluster.spec.cluster import ClusterSpec, RayCluster, SlurmCluster
from sft_cluster.spec.job import JobSpec
from sft_cluster.spec.templates import template_problem
from sft_cluster.storage import is_local, local_path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
_BUILTIN = "builtin:"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+|[\w.-]+")


def resolve_builtin(value: str) -> str:
    """``builtin:NAME`` -> absolute path of ``sft_cluster/assets/NAME``; other values unchanged."""
    if not value.startswith(_BUILTIN):
        return value
    return str(ASSETS / value.removeprefix(_BUILTIN))


def _local_path(value: str) -> Path:
    return local_path(resolve_builtin(value))


def _missing_builtin(field: str, value: str) -> str:
    available = sorted(path.name for path in ASSETS.iterdir()) if ASSETS.is_dir() else []
    close = difflib.get_close_matches(value.removeprefix(_BUILTIN), available, n=1, cutoff=0.6)
    fix = f"did you mean 'builtin:{close[0]}'?" if close else f"available: {', '.join(available)}"
    return f"{field} = {value!r}: no such builtin asset ({fix})"


def _model_problem(field: str, value: str) -> str | None:
    """A model reference is a local folder, ``builtin:NAME`` or a hub id such as ``org/name``."""
    if value.startswith(_BUILTIN):
        return None if _local_path(value).exists() else _missing_builtin(field, value)
    if is_local(value) and _local_path(value).exists():
        return None
    looks_local = value.startswith(("/", "./", "../", "~")) or value.endswith("/")
    if not looks_local and _HUB_ID.fullmatch(value):
        return None  # downloaded from the hub when the job starts
    return (
        f"{field} = {value!r}: no such directory (give an existing local model folder, "
        "a hub id such as 'Qwen/Qwen2.5-0.5B', or builtin:tiny-llama)"
    )


def _source_problem(field: str, uri: str) -> str | None:
    if uri.startswith(_BUILTIN):
        return None if _local_path(uri).exists() else _missing_builtin(field, uri)
    path = str(_local_path(uri))
    if glob.has_magic(path):
        if glob.glob(path, recursive=True):
            return None
        return f"{field} = {uri!r}: the pattern matches no files (check the path and the pattern)"
    if Path(path).exists():
        return None
    return (
        f"{field} = {uri!r}: no such file or directory "
        "(check the path; relative paths are from the current directory)"
    )


def check_local_paths(job: JobSpec) -> list[str]:
    """Problems with local model and data paths; remote URIs are checked where they are read."""
    problems = [
        _model_problem(field, value)
        for field, value in (
            ("model.name_or_path", job.model.name_or_path),
            ("model.tokenizer", job.model.tokenizer),
        )
        if value is not None
    ]
    if job.model.chat_template is not None:
        problems.append(template_problem(job.model.chat_template))
    problems += [
        _source_problem(f"data.{field}[{index}].uri", source.uri)
        for field, sources in (("sources", job.data.sources), ("eval", job.data.eval))
        for index, source in enumerate(sources)
        if is_local(source.uri)
    ]
    return [problem for problem in problems if problem is not None]


def validate_pair(job: JobSpec, cluster: ClusterSpec) -> list[str]:
    """Warnings for a job on a cluster: not invalid, but likely to fail or lose results."""
    warnings = []
    multi_node = (isinstance(cluster, RayCluster) and cluster.multi_node) or (
        isinstance(cluster, SlurmCluster) and (cluster.nodes or 1) > 1
    )
    local_output = job.output_uri is not None and is_local(job.output_uri)
    if multi_node and local_output and not job.storage.shared_filesystem:
        warnings.append(
            f"output_uri = {job.output_uri!r} is a local path on a multi-node cluster: each node "
            "would write its own partial copy, and the run is refused at start; use shared storage "
            f"such as s3://bucket/runs/{job.name}, or set storage.shared_filesystem: true if the "
            "path is on a filesystem every node mounts"
        )
    if isinstance(cluster, SlurmCluster) and job.resources.gpus_per_worker > 0 and cluster.gpus_per_node == 0:
        warnings.append(
            f"resources.gpus_per_worker = {job.resources.gpus_per_worker} but the Slurm cluster "
            "has gpus_per_node = 0: the workers would wait for GPUs that are never allocated"
        )
    return warnings
