"""The job's ``strategy`` section: DDP, FSDP, DeepSpeed ZeRO, LoRA, kernels, and the combinations
that cannot run on the job's workers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, ValidatorFunctionWrapHandler, field_validator, model_validator

from sft_cluster.spec.base import Strict, rule_error

if TYPE_CHECKING:
    from sft_cluster.spec.job import JobSpec


class FSDPSpec(Strict):
    version: Literal[1, 2] = 2
    reshard_after_forward: bool = True
    wrap: str = "auto"  # the decoder-layer class name, or "auto" for the model's own
    cpu_offload: bool = False
    state_dict: Literal["sharded", "full"] = "sharded"


class DeepSpeedSpec(Strict):
    stage: Literal[2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    overlap_comm: bool = True
    gather_16bit_weights_on_save: bool = True
    # ZeRO-3 keeps parameters smaller than this whole on every rank; None: DeepSpeed's default.
    param_persistence_threshold: int | None = Field(None, ge=0)


class LoraSpec(Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, le=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    merge: bool = False

    @field_validator("target_modules", mode="wrap")
    @classmethod
    def _one_message(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """One plain message instead of one error per member of the union."""
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("expected 'all-linear' or a list of module names") from None


class StrategySpec(Strict):
    kind: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    activation_checkpointing: bool = False
    fsdp: FSDPSpec = Field(default_factory=FSDPSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    lora: LoraSpec | None = None
    liger: bool = False  # Liger's Triton kernels (RMSNorm, RoPE, SwiGLU): CUDA and liger_kernel
    compile: bool = False  # torch.compile the model (inductor); the first steps pay for compiling

    @model_validator(mode="after")
    def _consistent(self) -> StrategySpec:
        # A block equal to its defaults changes nothing, and is what dump_job_yaml writes.
        problems = [
            f"strategy.{block} is set but strategy.kind is '{self.kind}' "
            f"(set strategy.kind: {block}, or remove the strategy.{block} block)"
            for block, default in (("fsdp", FSDPSpec()), ("deepspeed", DeepSpeedSpec()))
            if block in self.model_fields_set and self.kind != block and getattr(self, block) != default
        ]
        if self.deepspeed.offload_params and self.deepspeed.stage != 3:
            problems.append(
                "strategy.deepspeed.offload_params: true requires strategy.deepspeed.stage: 3 "
                f"(got stage {self.deepspeed.stage}; only ZeRO-3 partitions the parameters)"
            )
        if problems:
            raise rule_error(*problems)
        return self


def strategy_problems(job: JobSpec) -> list[str]:
    """Combinations that cannot run (on these workers), each with its reason and fix."""
    strategy, problems = job.strategy, []
    on_cpu = job.resources.gpus_per_worker == 0
    if on_cpu and strategy.precision == "fp16":
        problems.append(
            "strategy.precision = 'fp16' with resources.gpus_per_worker = 0: fp16 loss scaling "
            "needs a GPU (use bf16 or fp32 on CPU workers)"
        )
    if strategy.kind == "fsdp" and on_cpu:
        if strategy.fsdp.version == 1:
            problems.append(
                "strategy.fsdp.version = 1 with resources.gpus_per_worker = 0: FSDP1 does not run "
                "on CPU (use strategy.fsdp.version: 2)"
            )
        if strategy.fsdp.cpu_offload:
            problems.append(
                "strategy.fsdp.cpu_offload = true with resources.gpus_per_worker = 0: the "
                "parameters already live on the CPU (remove strategy.fsdp.cpu_offload)"
            )
    if on_cpu and strategy.liger:
        problems.append(
            "strategy.liger = true with resources.gpus_per_worker = 0: Liger's kernels are Triton "
            "kernels that need a CUDA GPU (remove strategy.liger, or give the workers GPUs)"
        )
    lora = strategy.lora
    if lora is not None:
        if strategy.kind == "deepspeed" and strategy.deepspeed.offload_params:
            problems.append(
                "strategy.lora with strategy.deepspeed.offload_params = true: peft adapters are not "
                "supported with ZeRO-3 parameter offload (use offload_optimizer only)"
            )
        if job.model.from_config and not lora.merge:
            problems.append(
                "strategy.lora.merge = false with model.from_config = true: the base weights are a "
                "random initialisation that is never saved, so the adapter alone is useless "
                "(set strategy.lora.merge: true)"
            )
    return problems
