"""DDP, FSDP2 and DeepSpeed ZeRO-2/3 from the job's ``strategy`` section.

The user never writes an accelerate or DeepSpeed config: ``plan_strategy``
derives the Trainer arguments (FSDP plugin settings, the DeepSpeed JSON with
``train_batch_size = micro x grad_accum x world``) from the spec, and the
same plan is written to the run directory and printed by ``--dry-run``.

Two narrow workarounds make the CPU path real (see docs/strategies.md and
``sft_cluster.train.compat``): DeepSpeed needs accelerate to reuse the gloo
group the launcher created, and accelerate enables FSDP only for GPU device
types, so on CPU the shared state is marked MULTI_GPU before the Trainer
builds its Accelerator (the device stays CPU). On GPUs neither is touched:
accelerate's own FSDP path and DeepSpeed's CUDA accelerator run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from sft_cluster.spec import JobSpec, ModelSpec, resolve_builtin
from sft_cluster.train import compat


def gpu_worker(job: JobSpec) -> bool:
    """Whether this rank trains on a GPU: the job asks for GPUs and CUDA is there.

    A GPU job on a worker without CUDA (a CPU build of torch, no driver) is an
    error here: it would otherwise train on the CPU in fp32, silently and slowly.
    """
    import torch

    wanted = job.resources.gpus_per_worker
    if wanted <= 0:
        return False
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"resources.gpus_per_worker = {wanted} but this worker sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use a CUDA build of "
            "torch on a GPU node, or resources.gpus_per_worker: 0 to train on CPU"
        )
    return True


def bf16_capable() -> bool:
    """Native bf16 (Ampere and newer): torch's default check also counts emulated bf16 (V100, T4)."""
    import torch

    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(job: JobSpec, bf16_capable: bool) -> str:
    """``auto`` is bf16 on a GPU that has it and fp32 otherwise.

    bf16/fp16 are mixed precision: the fp32 master weights and optimizer state
    stay fp32 (DeepSpeed keeps them in its optimizer) and the compute is cast.
    """
    choice = job.strategy.precision
    if choice == "auto":
        choice = "bf16" if bf16_capable else "fp32"
    return choice


@dataclass
class StrategyPlan:
    """What the Trainer gets for one strategy, and the record of it."""

    kind: str
    world_size: int
    trainer_args: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    deepspeed: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        """JSON for ``strategy.json`` in the run directory and for ``--dry-run``."""
        accelerate = {k: v for k, v in self.trainer_args.items() if k != "deepspeed"}
        return {
            "kind": self.kind,
            "world_size": self.world_size,
            "accelerate": accelerate,
            "deepspeed": self.deepspeed,
            "lora": self.lora,
            "env": self.env,
        }


def decoder_layer_class(model: ModelSpec) -> str:
    """The model's own decoder-layer class (FSDP wraps each one), read from its config only."""
    from transformers import AutoConfig

    path = resolve_builtin(model.name_or_path)
    return compat.decoder_layer_class(
        AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    )


def deepspeed_config(job: JobSpec, world_size: int, precision: str, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON; batch fields are explicit so a mismatch fails at start, not silently."""
    spec, train = job.strategy.deepspeed, job.train
    zero: dict[str, Any] = {
        "stage": spec.stage,
        "overlap_comm": spec.overlap_comm,
        "contiguous_gradients": True,
    }
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if spec.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = spec.gather_16bit_weights_on_save
        if spec.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
        if spec.param_persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = spec.param_persistence_threshold
    return {
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * world_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # The Trainer's own AdamW (the same optimizer as DDP and FSDP, so losses agree).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


def _fsdp_args(job: JobSpec) -> dict[str, Any]:
    spec = job.strategy.fsdp
    wrap = decoder_layer_class(job.model) if spec.wrap == "auto" else spec.wrap
    options = ["full_shard", "auto_wrap"] + (["offload"] if spec.cpu_offload else [])
    return {
        "fsdp": " ".join(options),
        "fsdp_config": {
            "version": spec.version,
            "reshard_after_forward": spec.reshard_after_forward,
            "transformer_layer_cls_to_wrap": [wrap],
            "state_dict_type": "SHARDED_STATE_DICT" if spec.state_dict == "sharded" else "FULL_STATE_DICT",
            # FSDP recomputes activations per wrapped layer itself (the Trainer's flag is refused).
            "activation_checkpointing": job.strategy.activation_checkpointing,
            # FSDP2: rank 0 alone loads; the others receive their shards (``builds_weights``).
            "cpu_ram_efficient_loading": spec.version == 2,
        },
    }


def builds_weights(plan: StrategyPlan, rank: int) -> bool:
    """Whether this rank reads or initialises the model's weights itself.

    Under FSDP2 only rank 0 does: accelerate (``cpu_ram_efficient_loading``)
    fills every rank's shards from rank 0's weights while preparing the model
    (``compat.scatter_shards_from_rank0``), so a rank never holds more than its
    shards, and a model built from a config is rank 0's seeded one everywhere.
    A resumed run then loads its sharded checkpoint over them, as before.
    """
    config = plan.trainer_args.get("fsdp_config", {})
    return rank == 0 or not config.get("cpu_ram_efficient_loading", False)


def lora_config(job: JobSpec) -> dict[str, Any] | None:
    lora = job.strategy.lora
    if lora is None:
        return None
    return {
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": lora.target_modules,
        "task_type": "CAUSAL_LM",
    }


def plan_strategy(job: JobSpec, world_size: int, precision: str, on_gpu: bool) -> StrategyPlan:
    """Trainer arguments and process environment for ``job.strategy`` on ``world_size`` ranks."""
    kind = job.strategy.kind
    plan = StrategyPlan(kind=kind, world_size=world_size, lora=lora_config(job))
    gradient_checkpointing = job.strategy.activation_checkpointing
    if kind == "fsdp":
        plan.trainer_args.update(_fsdp_args(job))
        gradient_checkpointing = False
    elif kind == "deepspeed":
        plan.deepspeed = deepspeed_config(job, world_size, precision, on_gpu)
        plan.trainer_args["deepspeed"] = plan.deepspeed
        # accelerate must keep the process group the launcher made (compat.shared_state_for_deepspeed).
        plan.trainer_args["accelerator_config"] = {"use_configured_state": True}
        plan.env.update(compat.deepspeed_env(on_gpu))
    plan.trainer_args["gradient_checkpointing"] = gradient_checkpointing
    # transformers' own switches: the Trainer applies Liger's kernels to the model at train() (TRL
    # keeps its fused LM head, so Liger's fused cross-entropy stays off), and accelerate compiles
    # the prepared model (with inductor).
    plan.trainer_args["use_liger_kernel"] = job.strategy.liger
    plan.trainer_args["torch_compile"] = job.strategy.compile
    return plan


# Set by an executor whose workers see more GPUs than their own (Ray Train: every GPU of the
# node is visible, ``ray.train.torch.get_device()`` names this worker's): the CUDA index to use.
DEVICE_ENV = "SFT_CLUSTER_CUDA_DEVICE"


def select_gpu() -> int:
    """Make this rank's GPU the current device before accelerate and DeepSpeed pick theirs.

    Under torchrun it is ``cuda:LOCAL_RANK``. Where the executor names the
    device (``DEVICE_ENV``: Ray Train, whose workers see all of the node's GPUs),
    LOCAL_RANK becomes that index where the two differ (more than one GPU per
    worker, see ``compat.align_local_rank``). Ray orders local ranks by lowest GPU
    id, so local rank 0 stays index 0.
    """
    import torch

    named = os.environ.get(DEVICE_ENV)
    if named is None:  # as accelerate counts: one process per visible GPU, in order
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    else:  # Ray already points accelerate at it (ACCELERATE_TORCH_DEVICE)
        index = int(named)
        compat.align_local_rank(index)
    torch.cuda.set_device(index)
    return index


def prepare_process(plan: StrategyPlan, on_gpu: bool) -> None:
    """Before the SFTConfig: this rank's device, environment, and the shared state DeepSpeed must reuse."""
    if on_gpu:
        select_gpu()
    os.environ.update(plan.env)
    if plan.kind == "deepspeed":
        if on_gpu:
            compat.force_deepspeed_cuda()
        compat.shared_state_for_deepspeed(on_gpu)


def prepare_trainer(plan: StrategyPlan, on_gpu: bool) -> None:
    """After the SFTConfig, before the Trainer builds its Accelerator: FSDP on CPU ranks goes through
    ``fully_shard`` (``compat.route_cpu_fsdp``) while every tensor stays on CPU and the gloo group is reused;
    loading from rank 0 scatters each rank its shards only (``compat.scatter_shards_from_rank0``).
    """
    if plan.kind == "fsdp" and not on_gpu:
        compat.route_cpu_fsdp()
    if plan.trainer_args.get("fsdp_config", {}).get("cpu_ram_efficient_loading"):
        compat.scatter_shards_from_rank0()


def describe_strategy(job: JobSpec) -> dict[str, Any]:
    """The generated settings for ``--dry-run``, before any worker exists.

    Uses ``resources.num_workers`` as the world size and assumes a GPU worker
    has bf16; the run writes what it really used to ``strategy.json``.
    """
    on_gpu = job.resources.gpus_per_worker > 0
    plan = plan_strategy(job, job.resources.max_workers, resolve_precision(job, on_gpu), on_gpu)
    return plan.record()
