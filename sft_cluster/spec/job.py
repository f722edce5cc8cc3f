"""The job file: what to train, on what data, how, and where the results go."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

_CREDENTIAL_KEYS = {
    "key",
    "secret",
    "token",
    "password",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "access_key",
    "secret_key",
}


class Strict(BaseModel):
    """Every section rejects unknown keys, so a typo is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


def reject_credentials(options: dict[str, Any]) -> dict[str, Any]:
    """Credentials come from the environment, never from a file we read or write."""
    for key, value in options.items():
        if key.lower() in _CREDENTIAL_KEYS:
            # Its own error type, so the message never echoes the secret value.
            raise PydanticCustomError(
                "credential",
                "'{key}' looks like a credential: credentials come from the environment "
                "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS), not job files",
                {"key": key},
            )
        if isinstance(value, dict):
            reject_credentials(value)
    return options


class StorageSpec(Strict):
    endpoint_url: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    _no_credentials = field_validator("options")(reject_credentials)


class ModelSpec(Strict):
    name_or_path: str
    from_config: bool = False
    tokenizer: str | None = None
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
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    storage_options: dict[str, Any] = Field(default_factory=dict)

    _no_credentials = field_validator("storage_options")(reject_credentials)


class TrainSpec(Strict):
    max_steps: int = Field(gt=0)
    micro_batch_size: int = Field(4, gt=0)
    grad_accum_steps: int = Field(1, gt=0)
    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = Field(42, ge=0)
    logging_steps: int = Field(1, gt=0)
    eval_every_n_steps: int | None = Field(None, gt=0)


class FSDPSpec(Strict):
    version: Literal[1, 2] = 2
    reshard_after_forward: bool = True
    wrap: str = "auto"
    cpu_offload: bool = False
    state_dict: Literal["sharded", "full"] = "sharded"


class DeepSpeedSpec(Strict):
    stage: Literal[2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    overlap_comm: bool = True
    gather_16bit_weights_on_save: bool = True

    @model_validator(mode="after")
    def _offload_params_needs_stage3(self) -> DeepSpeedSpec:
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage: 3 (ZeRO-2 does not partition parameters)")
        return self


class LoraSpec(Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, le=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    merge: bool = False


class StrategySpec(Strict):
    kind: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    activation_checkpointing: bool = False
    fsdp: FSDPSpec = Field(default_factory=FSDPSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    lora: LoraSpec | None = None

    @model_validator(mode="after")
    def _options_match_kind(self) -> StrategySpec:
        defaults = {"fsdp": FSDPSpec(), "deepspeed": DeepSpeedSpec()}
        for other, default in defaults.items():
            if self.kind != other and getattr(self, other) != default:
                raise ValueError(
                    f"strategy.{other} options are set but strategy.kind is '{self.kind}' "
                    f"(set kind: {other}, or remove the {other} block)"
                )
        return self


class CheckpointSpec(Strict):
    every_n_steps: int | None = Field(None, gt=0)
    keep_last: int = Field(2, ge=1)
    keep_every_n_steps: int | None = Field(None, gt=0)
    resume: Literal["auto", "never"] = "auto"
    max_failures: int = Field(3, ge=0)
    preemption_signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"]] = Field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1"]
    )


class ResourcesSpec(Strict):
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)


_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class JobSpec(Strict):
    name: str
    output_uri: str | None = None
    model: ModelSpec
    data: DataSpec
    train: TrainSpec
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    storage: StorageSpec = Field(default_factory=StorageSpec)

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use 1-64 characters from A-Z a-z 0-9 . _ -")
        return value

    @field_validator("tracking", mode="before")
    @classmethod
    def _tracking_as_list(cls, value: Any) -> Any:
        if value is None or value == "none":
            return []
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _default_output_uri(self) -> JobSpec:
        if not self.output_uri:
            self.output_uri = f"runs/{self.name}"
        return self
