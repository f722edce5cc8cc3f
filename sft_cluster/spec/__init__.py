"""Typed job and cluster files (pydantic v2, unknown keys rejected) and their loaders."""

from sft_cluster.spec.checks import check_local_paths, validate_pair
from sft_cluster.spec.cluster import (
    ClusterSpec,
    LocalCluster,
    RayAuthSpec,
    RayCluster,
    RayRuntimeEnvSpec,
    SlurmCluster,
    SlurmContainerSpec,
)
from sft_cluster.spec.job import (
    CheckpointSpec,
    DataSpec,
    DeepSpeedSpec,
    FSDPSpec,
    JobSpec,
    LoraSpec,
    ModelSpec,
    ResourcesSpec,
    SourceSpec,
    StorageSpec,
    StrategySpec,
    TrainSpec,
)
from sft_cluster.spec.loader import (
    SpecError,
    apply_overrides,
    dump_job_yaml,
    load_cluster,
    load_job,
    parse_overrides,
    resolve_builtin,
)

__all__ = [
    "CheckpointSpec", "ClusterSpec", "DataSpec", "DeepSpeedSpec", "FSDPSpec", "JobSpec",
    "LocalCluster", "LoraSpec", "ModelSpec", "RayAuthSpec", "RayCluster", "RayRuntimeEnvSpec",
    "ResourcesSpec", "SlurmCluster", "SlurmContainerSpec", "SourceSpec", "SpecError",
    "StorageSpec", "StrategySpec", "TrainSpec", "apply_overrides", "check_local_paths",
    "dump_job_yaml", "load_cluster", "load_job", "parse_overrides", "resolve_builtin",
    "validate_pair",
]
