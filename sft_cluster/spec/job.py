"""The job file: what to train, on what data, how, and where the results go."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidatorFunctionWrapHandler, field_validator, model_validator

from sft_cluster.spec.base import Strict, rule_error
from sft_cluster.spec.strategy import StrategySpec, strategy_problems
from sft_cluster.spec.watchdog import WatchdogSpec

# Keys that carry secrets in fsspec storage options (s3fs, gcsfs, adlfs).
_CREDENTIAL_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
    }
)
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def reject_credentials(options: dict[str, Any]) -> dict[str, Any]:
    """Credentials come from the environment, never from a file we read, copy or log."""
    for key, value in options.items():
        if key.lower() in _CREDENTIAL_KEYS:
            raise ValueError(
                f"'{key}' is a credential and is not allowed in a file: credentials come from "
                "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, ...)"
            )
        if isinstance(value, dict):
            reject_credentials(value)
    return options


class StorageSpec(Strict):
    endpoint_url: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    # A local output_uri is on a filesystem every node mounts (NFS, Lustre): multi-node may use it.
    shared_filesystem: bool = False

    _no_credentials = field_validator("options")(reject_credentials)


class ModelSpec(Strict):
    name_or_path: str
    from_config: bool = False
    tokenizer: str | None = None
    # A built-in template name (chatml, or one TRL ships: qwen2_5, llama3, ...) or a .jinja file,
    # used instead of the tokenizer's own (or where it has none: a base model).
    chat_template: str | None = None
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False


class SourceSpec(Strict):
    uri: str
    format: Literal["jsonl", "json", "parquet"] | None = None
    weight: float = Field(1.0, gt=0)
    columns: dict[str, str] = Field(default_factory=dict)
    storage_options: dict[str, Any] = Field(default_factory=dict)

    _no_credentials = field_validator("storage_options")(reject_credentials)


class DataSpec(Strict):
    sources: list[SourceSpec] = Field(min_length=1)
    max_seq_len: int = Field(512, ge=16)
    packing: bool = True
    assistant_only_loss: bool = True
    on_bad_record: Literal["error", "skip"] = "error"
    max_bad_records: int = Field(100, ge=0)
    truncation: Literal["drop", "truncate"] = "drop"
    # Rows a background thread reads, tokenizes and packs ahead of the training step (0: in the
    # step, as the step asks). The rows and the cursor are the same either way.
    prefetch_rows: int = Field(128, ge=0)
    # Held-out evaluation data: its own sources, or a deterministic fraction of the training
    # records (chosen by a hash of each record, so the same records whatever the world size).
    eval: list[SourceSpec] = Field(default_factory=list)
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    storage_options: dict[str, Any] = Field(default_factory=dict)

    _no_credentials = field_validator("storage_options")(reject_credentials)


class TrainSpec(Strict):
    # How long to train, exactly one of: optimizer steps, or passes over the data (counted in packed
    # rows before training; see sft_cluster/train/steps.py).
    max_steps: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    micro_batch_size: int = Field(4, gt=0)
    grad_accum_steps: int = Field(1, gt=0)
    # Rows per optimizer step over all workers. Set, it fixes the product micro x accumulation x
    # workers at any world size: micro_batch_size is then the largest the split may use.
    global_batch_size: int | None = Field(None, gt=0)
    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = Field(42, ge=0)
    logging_steps: int = Field(1, gt=0)
    eval_every_n_steps: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_length(self) -> TrainSpec:
        if self.max_steps is not None and self.epochs is not None:
            raise rule_error(
                f"train.max_steps = {self.max_steps} and train.epochs = {self.epochs:g} are both set "
                "(train for one of them: remove the other, e.g. with the override train.max_steps=null)"
            )
        if self.max_steps is None and self.epochs is None:
            raise rule_error(
                "train.max_steps or train.epochs is required (how long to train: optimizer steps, "
                "e.g. train.max_steps: 1000, or passes over the data, e.g. train.epochs: 1)"
            )
        return self


class CheckpointSpec(Strict):
    # None: only the final checkpoint; auto: Daly's optimum from the measured step time and
    # checkpoint stall and mttf_hours (sft_cluster.train.interval).
    every_n_steps: int | Literal["auto"] | None = None
    mttf_hours: float | None = Field(None, gt=0)  # the job's mean time between failures
    keep_last: int = Field(2, ge=1)
    keep_every_n_steps: int | None = Field(None, gt=0)
    resume: Literal["auto", "never"] = "auto"
    max_failures: int = Field(3, ge=0)
    async_upload: bool = True  # upload while training continues; false waits for each upload
    preemption_signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"]] = Field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1"]
    )

    @field_validator("every_n_steps", mode="before")
    @classmethod
    def _steps_or_auto(cls, value: Any) -> Any:
        """One plain message instead of one per member of the union."""
        if value is None or value == "auto" or (type(value) is int and value > 0):
            return value
        raise ValueError("must be a positive number of steps, or auto (with checkpoint.mttf_hours)")

    @model_validator(mode="after")
    def _auto_needs_mttf(self) -> CheckpointSpec:
        if self.every_n_steps == "auto" and self.mttf_hours is None:
            raise rule_error(
                "checkpoint.every_n_steps = auto needs checkpoint.mttf_hours, the job's mean time "
                "between failures in hours (e.g. 24), to weigh checkpoint stalls against lost work"
            )
        if self.mttf_hours is not None and self.every_n_steps != "auto":
            raise rule_error(
                f"checkpoint.mttf_hours = {self.mttf_hours:g} is used only with checkpoint.every_n_steps = "
                "auto (set that, or remove checkpoint.mttf_hours)"
            )
        return self


class ExportSpec(Strict):
    """``final/``: the dtype its weights are written in (auto: bf16 when training ran in bf16 on GPUs,
    else fp32, the master weights) and the largest safetensors file (as ``save_pretrained`` shards)."""

    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    max_shard_size: str = "5GB"

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        if not re.fullmatch(r"\d+ ?[KMGT]B", value.strip(), re.IGNORECASE):
            raise ValueError("expected a whole number and a unit: KB, MB, GB or TB (e.g. '5GB')")
        return value


class WorkerRange(Strict):
    """An elastic worker count: the run goes on with as many as the cluster gives, in [min, max]."""

    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> WorkerRange:
        if self.min > self.max:
            raise rule_error(
                f"resources.num_workers = {{min: {self.min}, max: {self.max}}}: min is above max"
            )
        return self


class ResourcesSpec(Strict):
    num_workers: int | WorkerRange = 1
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    # Elastic runs (num_workers {min, max}): how often Ray Train considers growing a healthy group.
    resize_interval_s: float = Field(60.0, gt=0)

    @field_validator("num_workers", mode="wrap")
    @classmethod
    def _count_or_range(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """One plain message instead of one error per member of the union."""
        if isinstance(value, dict):
            return WorkerRange.model_validate(value)
        try:
            count = handler(value)
        except ValidationError:
            count = None
        if not isinstance(count, int) or count < 1:
            raise ValueError(
                "must be a positive integer (at least 1 worker), or {min: M, max: N} for an elastic run"
            )
        return count

    @property
    def max_workers(self) -> int:
        """The most workers the run asks for (the fixed count, or the range's max)."""
        return self.num_workers.max if isinstance(self.num_workers, WorkerRange) else self.num_workers

    @property
    def min_workers(self) -> int:
        return self.num_workers.min if isinstance(self.num_workers, WorkerRange) else self.num_workers

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, WorkerRange)

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_gpus(cls, value: float) -> float:
        """NCCL refuses two ranks on one device ("Duplicate GPU detected"): no shared GPUs."""
        if value != int(value):
            raise ValueError(
                f"each worker needs whole GPUs of its own (0 for CPU, else 1, 2, ...), not {value}"
            )
        return value


class JobSpec(Strict):
    name: str
    output_uri: str | None = None  # filled in: runs/<name>
    model: ModelSpec
    data: DataSpec
    train: TrainSpec
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    watchdog: WatchdogSpec = Field(default_factory=WatchdogSpec)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        """The name becomes part of paths and job ids, so keep it to portable characters."""
        if not _NAME.fullmatch(value):
            raise ValueError("must be 1-64 characters, each a letter, a digit, '.', '_' or '-'")
        return value

    @field_validator("tracking", mode="before")
    @classmethod
    def _tracking_as_list(cls, value: Any) -> Any:
        """``tracking: tensorboard`` and ``tracking: none`` read naturally in YAML."""
        if value is None or value == "none":
            return []
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _defaults_and_rules(self) -> JobSpec:
        has_eval = bool(self.data.eval) or self.data.eval_fraction > 0
        if self.train.eval_every_n_steps is not None and not has_eval:
            raise rule_error(
                "train.eval_every_n_steps is set but there is nothing to evaluate on "
                "(set data.eval_fraction, e.g. 0.05, or data.eval sources, or remove "
                "train.eval_every_n_steps)"
            )
        if self.data.eval and self.data.eval_fraction > 0:
            raise rule_error(
                "data.eval and data.eval_fraction are both set (evaluate on the data.eval sources "
                "or on a held-out fraction of the training data, not both)"
            )
        problems = strategy_problems(self) + _elastic_problems(self)
        if problems:
            raise rule_error(*problems)
        if not self.output_uri:
            self.output_uri = f"runs/{self.name}"
        return self


def _elastic_problems(job: JobSpec) -> list[str]:
    """An elastic worker count keeps one global batch at every size it runs at (which sizes those
    are depends on the launcher: it checks that the batch splits over each)."""
    resources = job.resources
    if not resources.elastic or job.train.global_batch_size is not None:
        return []
    return [
        f"resources.num_workers = {{min: {resources.min_workers}, max: {resources.max_workers}}} needs "
        "train.global_batch_size: the rows of one optimizer step over all workers, kept at every world "
        f"size (e.g. train.global_batch_size: "
        f"{job.train.micro_batch_size * job.train.grad_accum_steps * resources.max_workers})"
    ]
