"""The cluster file: where a job runs (``kind: local | ray | slurm``)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, TypeAdapter, field_validator, model_validator

from sft_cluster.spec.base import Strict, rule_error
from sft_cluster.spec.job import StorageSpec

# sbatch --time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_SLURM_TIME = re.compile(
    r"\d+|\d+:[0-5]\d|\d+:[0-5]\d:[0-5]\d|\d+-\d+|\d+-\d+:[0-5]\d|\d+-\d+:[0-5]\d:[0-5]\d"
)
# sbatch --signal: [{B|R|BR|RB}:]SIGNAL[@SECONDS], SIGNAL a name (USR1, SIGUSR1) or a number
_SLURM_SIGNAL = re.compile(r"(?:(?:B|R|BR|RB):)?(?:(?:SIG)?[A-Z][A-Z0-9]*|\d+)(?:@\d+)?")
_SLURM_NAME = re.compile(r"[A-Za-z0-9._-]+")
_SLURM_MEM = re.compile(r"\d+[KMGT]?", re.IGNORECASE)
# An environment variable that holds a secret, by whole words of its name (so TOKENIZERS_PARALLELISM
# is not one): refused in a cluster file's env_vars, redacted in a Ray Job's dry run.
CREDENTIAL_VAR = re.compile(
    r"(?:^|_)(?:API)?(?:KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIALS?|SESSION)S?(?:_|$)", re.IGNORECASE
)
_URL_USERINFO = re.compile(r"(://)[^/@\s:]+:[^/@\s]+@")


def redact_text(text: str) -> str:
    """Hide ``user:password@`` in URLs (a Ray address, an endpoint in a job, an error message)."""
    return _URL_USERINFO.sub(r"\1<redacted>@", text)


def _long_option(line: str) -> str:
    if not line.startswith("--"):
        raise ValueError("must be a long sbatch option starting with '--', e.g. --mail-type=END")
    return line


class LocalCluster(Strict):
    kind: Literal["local"] = "local"
    num_cpus: int | None = Field(None, gt=0)
    temp_dir: str | None = None
    storage: StorageSpec = Field(default_factory=StorageSpec)


class RayAuthSpec(Strict):
    mode: Literal["none", "token"] = "none"
    token_env: str = "RAY_AUTH_TOKEN"
    token_file: str | None = None


class RayRuntimeEnvSpec(Strict):
    working_dir: str = "."
    excludes: list[str] = Field(
        default_factory=lambda: [".venv", "runs/", ".git", "__pycache__", "*.pyc", ".pytest_cache"]
    )
    env_vars: dict[str, str] = Field(default_factory=dict)
    pass_env: list[str] = Field(default_factory=list)  # names or globs such as AWS_*
    py_modules: list[str] = Field(default_factory=list)
    image_uri: str | None = None

    @field_validator("env_vars")
    @classmethod
    def _no_credentials(cls, env: dict[str, str]) -> dict[str, str]:
        """A value written here would be stored by Ray with the job; pass_env copies it instead."""
        for name in env:
            if CREDENTIAL_VAR.search(name):
                raise ValueError(
                    f"'{name}' looks like a credential: list it in runtime_env.pass_env so it is "
                    "copied from your environment at submit time instead of written in a file"
                )
        return env


class RayCluster(Strict):
    kind: Literal["ray"] = "ray"
    address: str | None = None  # None: RAY_API_SERVER_ADDRESS or RAY_ADDRESS at submit time
    auth: RayAuthSpec = Field(default_factory=RayAuthSpec)
    runtime_env: RayRuntimeEnvSpec = Field(default_factory=RayRuntimeEnvSpec)
    entrypoint_num_cpus: float = Field(0, ge=0)
    entrypoint_resources: dict[str, float] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict)
    multi_node: bool = False
    storage: StorageSpec = Field(default_factory=StorageSpec)

    @field_validator("address")
    @classmethod
    def _dashboard_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be the dashboard's http(s) address, e.g. http://head-node:8265")
        return value


class SlurmContainerSpec(Strict):
    kind: Literal["pyxis", "apptainer"]
    image: str
    mounts: list[str] = Field(default_factory=list)


class SlurmCluster(Strict):
    kind: Literal["slurm"] = "slurm"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int | None = Field(None, gt=0)
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int | None = Field(None, gt=0)
    mem: str | None = None
    time: str = "01:00:00"
    constraint: str | None = None
    exclusive: bool = False
    extra_sbatch: list[Annotated[str, AfterValidator(_long_option)]] = Field(default_factory=list)
    modules: list[str] = Field(default_factory=list)
    setup: str | None = None  # one shell line, e.g. "source /shared/venv/bin/activate"
    container: SlurmContainerSpec | None = None
    launcher: Literal["ray", "torchrun"] = "ray"
    signal: str = "B:USR1@300"
    max_requeues: int = Field(3, ge=0)
    storage: StorageSpec = Field(default_factory=StorageSpec)

    @field_validator("partition", "account", "qos")
    @classmethod
    def _slurm_name(cls, value: str | None) -> str | None:
        if value is not None and not _SLURM_NAME.fullmatch(value):
            raise ValueError("must use only letters, digits, '.', '_' and '-'")
        return value

    @field_validator("time")
    @classmethod
    def _slurm_time(cls, value: str) -> str:
        if not _SLURM_TIME.fullmatch(value):
            raise ValueError("must be a Slurm time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
        return value

    @field_validator("mem")
    @classmethod
    def _slurm_mem(cls, value: str | None) -> str | None:
        if value is not None and not _SLURM_MEM.fullmatch(value):
            raise ValueError("must be a Slurm memory size such as 64G, 500M or 0 (all of it)")
        return value

    @field_validator("signal")
    @classmethod
    def _slurm_signal(cls, value: str) -> str:
        if not _SLURM_SIGNAL.fullmatch(value):
            raise ValueError("must be [B:]SIGNAL[@SECONDS], e.g. B:USR1@300")
        return value

    @model_validator(mode="after")
    def _signal_reaches_the_batch_shell(self) -> SlurmCluster:
        """Without ``B:`` Slurm signals the job steps, not the batch script. Under the Ray template
        those are the ``ray start`` steps: SIGUSR1 kills the Ray cluster before the checkpoint
        commits and the job fails unrequeued (seen on 22.05, docs/slurm.md). torchrun's step
        holds the workers themselves, which checkpoint and exit 75: the script still requeues."""
        flags, sep, rest = self.signal.rpartition(":")
        if self.launcher == "ray" and "B" not in flags:
            fix = f"{flags}B:{rest}" if sep else f"B:{rest}"
            raise rule_error(
                f"signal = {self.signal!r} with launcher: ray: without 'B:' Slurm signals the job "
                "steps (the `ray start` processes) instead of the batch script; the Ray cluster goes "
                f"down before a checkpoint is committed and the job fails without a requeue (use {fix!r})"
            )
        return self


ClusterSpec = Annotated[LocalCluster | RayCluster | SlurmCluster, Field(discriminator="kind")]
CLUSTER_ADAPTER: TypeAdapter[ClusterSpec] = TypeAdapter(ClusterSpec)
CLUSTER_KINDS: dict[str, type[Strict]] = {
    "local": LocalCluster,
    "ray": RayCluster,
    "slurm": SlurmCluster,
}
