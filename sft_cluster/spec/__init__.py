"""Typed job and cluster files (pydantic v2, unknown keys rejected) and their loaders.

A bad file raises ``SpecError`` listing every problem at once, each naming the
field path, the bad value and the fix.
"""

from sft_cluster.spec.checks import check_local_paths, resolve_builtin, validate_pair
from sft_cluster.spec.cluster import (
    CLUSTER_ADAPTER,
    ClusterSpec,
    LocalCluster,
    RayAuthSpec,
    RayCluster,
    RayRuntimeEnvSpec,
    SlurmCluster,
    SlurmContainerSpec,
)
from sft_cluster.spec.errors import SpecError
from sft_cluster.spec.job import (
    CheckpointSpec,
    DataSpec,
    JobSpec,
    ModelSpec,
    ResourcesSpec,
    SourceSpec,
    StorageSpec,
    TrainSpec,
)
from sft_cluster.spec.loader import (
    apply_overrides,
    dump_job_yaml,
    load_cluster,
    load_job,
    parse_overrides,
)
from sft_cluster.spec.strategy import DeepSpeedSpec, FSDPSpec, LoraSpec, StrategySpec
from sft_cluster.spec.watchdog import WatchdogSpec

__all__ = [
    "CLUSTER_ADAPTER",
    "CheckpointSpec",
    "ClusterSpec",
    "DataSpec",
    "DeepSpeedSpec",
    "FSDPSpec",
    "JobSpec",
    "LocalCluster",
    "LoraSpec",
    "ModelSpec",
    "RayAuthSpec",
    "RayCluster",
    "RayRuntimeEnvSpec",
    "ResourcesSpec",
    "SlurmCluster",
    "SlurmContainerSpec",
    "SourceSpec",
    "SpecError",
    "StorageSpec",
    "StrategySpec",
    "TrainSpec",
    "WatchdogSpec",
    "apply_overrides",
    "check_local_paths",
    "dump_job_yaml",
    "load_cluster",
    "load_job",
    "parse_overrides",
    "resolve_builtin",
    "validate_pair",
]
