"""What the worker configures on a GPU, checked where no GPU exists.

No GPU is lent to CI or to these sessions, so the GPU branches are checked by
what they set up: ``torch.cuda`` answers and the distributed state are
MOCKED here (each mock says so). The GPU itself is exercised by
``scripts/gpu_check.sh`` on a GPU machine.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from sft_cluster.driver.environment import ray_worker_runtime_env
from sft_cluster.launch.slurm import render
from sft_cluster.spec import CLUSTER_ADAPTER, load_job
from sft_cluster.train import compat, strategy, trainer
from sft_cluster.train import model as model_module

REPO = Path(__file__).resolve().parents[2]
GPU_JOB = ("resources.gpus_per_worker=1", "strategy.precision=auto")


def _job(*overrides: str):
    return load_job(REPO / "jobs" / "smoke.yaml", ["output_uri=/tmp/unused", *overrides])


@pytest.fixture
def clean_state(monkeypatch):
    """The process environment and accelerate's shared state as they were before the test."""
    saved = dict(os.environ)
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "DS_ACCELERATOR", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    yield
    os.environ.clear()
    os.environ.update(saved)
    compat.reset_accelerate_state()


def _gpu_sft_config(monkeypatch, tmp_path: Path, *overrides: str):
    """The SFTConfig ``sft_config`` builds for a GPU worker (plan made with on_gpu=True).

    MOCK: transformers refuses bf16 without a GPU that has it; it is told this machine has one.
    The shared state that prepare_process would make with NCCL is a marked CPU one here, and
    DeepSpeed, imported by the config, gets its CPU accelerator (this machine has no CUDA).
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    job = _job(*GPU_JOB, *overrides)
    precision = strategy.resolve_precision(job, bf16_capable=True)
    plan = strategy.plan_strategy(job, world_size=1, precision=precision, on_gpu=True)
    if plan.kind == "deepspeed":
        PartialState().distributed_type = DistributedType.DEEPSPEED
    return trainer.sft_config(job, str(tmp_path), precision, True, plan), plan


@pytest.mark.parametrize("kind", ["ddp", "fsdp", "deepspeed"])
def test_sft_config_on_a_gpu_is_bf16_and_not_cpu(monkeypatch, tmp_path, clean_state, kind):
    args, plan = _gpu_sft_config(monkeypatch, tmp_path, f"strategy.kind={kind}")
    assert args.use_cpu is False
    assert args.bf16 is True and args.fp16 is False
    if kind == "fsdp":
        assert args.fsdp_config["version"] == 2
        assert plan.trainer_args["fsdp"] == "full_shard auto_wrap"
    if kind == "deepspeed":
        assert args.hf_deepspeed_config.config["bf16"] == {"enabled": True}
        assert "DS_ACCELERATOR" not in plan.env  # the CPU accelerator is for CPU workers only


def test_sft_config_on_cpu_stays_fp32_on_the_cpu(tmp_path, clean_state):
    job = _job("strategy.precision=auto")
    precision = strategy.resolve_precision(job, bf16_capable=False)
    plan = strategy.plan_strategy(job, world_size=1, precision=precision, on_gpu=False)
    args = trainer.sft_config(job, str(tmp_path), precision, False, plan)
    assert precision == "fp32" and args.use_cpu is True and args.bf16 is False


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_only_where_the_gpu_has_it_natively(monkeypatch, native, expected):
    # MOCK: an H200 (native bf16) or a V100 (bf16 only emulated, which torch's default counts).
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native
    )
    assert strategy.resolve_precision(_job(*GPU_JOB), strategy.bf16_capable()) == expected


def test_gpu_job_without_cuda_is_an_error_not_a_silent_cpu_run(monkeypatch):
    # MOCK: torch.cuda.is_available answers as a GPU node would, then as a CPU build of torch would.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert strategy.gpu_worker(_job(*GPU_JOB)) is True
    assert strategy.gpu_worker(_job()) is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        strategy.gpu_worker(_job(*GPU_JOB))


@pytest.fixture
def devices(monkeypatch) -> list[int]:
    """MOCK: an 8-GPU node; records the devices made current."""
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_torchrun_rank_trains_on_cuda_local_rank(monkeypatch, clean_state, devices):
    monkeypatch.delenv(strategy.DEVICE_ENV, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert strategy.select_gpu() == 3 and devices == [3]


def test_ray_worker_trains_on_ray_train_device(monkeypatch, clean_state, devices):
    # MOCK: Ray gave this worker (local rank 1) GPUs 2 and 3: get_device() is cuda:2, which the
    # Ray executor passes on.
    monkeypatch.setenv(strategy.DEVICE_ENV, "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert strategy.select_gpu() == 2 and devices == [2]
    assert os.environ["LOCAL_RANK"] == "2"  # what DeepSpeed and accelerate's barrier index by


class _RecordedState:
    """MOCK of accelerate's PartialState: records the backend it was made with."""

    backends: list[str] = []

    def __init__(self, backend: str):
        self.backends.append(backend)


@pytest.mark.parametrize(
    ("on_gpu", "backend", "accelerator"), [(True, "nccl", "cuda"), (False, "gloo", "cpu")]
)
def test_deepspeed_uses_cuda_and_nccl_on_gpu(monkeypatch, clean_state, on_gpu, backend, accelerator):
    monkeypatch.setattr("accelerate.PartialState", _RecordedState)
    monkeypatch.setattr(strategy, "select_gpu", lambda: 0)  # MOCK: no GPU to select here
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # left over from a CPU run's environment
    _RecordedState.backends = []
    plan = strategy.plan_strategy(_job("strategy.kind=deepspeed"), 1, "bf16", on_gpu)
    strategy.prepare_process(plan, on_gpu)
    assert _RecordedState.backends == [backend]
    assert os.environ["DS_ACCELERATOR"] == accelerator
    assert os.environ["ACCELERATE_USE_DEEPSPEED"] == "true"


def test_fsdp_state_flip_happens_only_on_cpu(monkeypatch):
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    monkeypatch.setitem(PartialState._shared_state, "distributed_type", DistributedType.MULTI_GPU)
    plan = strategy.plan_strategy(_job("strategy.kind=fsdp"), 2, "bf16", on_gpu=True)
    monkeypatch.setitem(PartialState._shared_state, "distributed_type", DistributedType.NO)
    strategy.prepare_trainer(plan, on_gpu=True)
    assert PartialState._shared_state["distributed_type"] == DistributedType.NO  # accelerate's own path
    strategy.prepare_trainer(plan, on_gpu=False)
    assert PartialState._shared_state["distributed_type"] == DistributedType.MULTI_GPU


def test_flash_attention_only_with_flash_attn_else_sdpa_with_a_warning(monkeypatch, caplog):
    # MOCK: flash_attn installed on a CUDA machine, then missing (as here).
    monkeypatch.setattr(model_module, "is_flash_attn_2_available", lambda: True)
    assert model_module.attention_implementation("flash_attention_2") == "flash_attention_2"
    monkeypatch.setattr(model_module, "is_flash_attn_2_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="sft_cluster.train"):
        assert model_module.attention_implementation("flash_attention_2") == "sdpa"
    assert "training with sdpa instead" in caplog.text
    assert model_module.attention_implementation("eager") == "eager"
    job = _job("model.attn_implementation=flash_attention_2")
    built = model_module.build_model(job.model, seed=0)
    assert built.config._attn_implementation == "sdpa"


def test_nccl_settings_reach_ray_workers(monkeypatch):
    nccl = {
        "NCCL_DEBUG": "INFO",
        "NCCL_SOCKET_IFNAME": "ib0,eth0",
        "NCCL_IB_HCA": "mlx5_0:1",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    }
    for name, value in nccl.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("UNRELATED_SETTING", "x")
    env = ray_worker_runtime_env(_job())["env_vars"]
    assert nccl.items() <= env.items()
    assert "UNRELATED_SETTING" not in env
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"


@pytest.mark.parametrize("launcher", ["ray", "torchrun"])
def test_slurm_scripts_keep_the_submit_environment_for_nccl(launcher):
    cluster = CLUSTER_ADAPTER.validate_python(
        {"kind": "slurm", "gpus_per_node": 8, "nodes": 2, "launcher": launcher}
    )
    job = _job("resources.num_workers=16", "resources.gpus_per_worker=1")
    script = render(job, cluster, run_dir="/shared/runs/x/slurm", workdir="/shared/sft")
    assert "#SBATCH --export=ALL" in script  # NCCL_* set at sbatch time reach every srun step
    for clearing in ("--export=NONE", "env -i", "--cleanenv", "unset NCCL", "NCCL_"):
        assert clearing not in script


@pytest.mark.parametrize(
    "deepspeed,device,zero3,kept",
    [
        (True, "cuda", True, True),
        (True, "cpu", True, False),
        (True, "cuda", False, False),
        (False, "cuda", False, False),
    ],
)
def test_only_zero3_on_a_gpu_defers_its_consolidated_weights_without_copying_them(
    deepspeed, device, zero3, kept
):
    """DeepSpeed's consolidated ZeRO-3 state dict is a host copy of its own on a GPU: written later as
    it is, it is never kept in the refilled host buffers (a whole model for the run). The trainer,
    its device and the ZeRO-3 parameter are MOCKED (SimpleNamespace): no GPU or engine here."""
    from types import SimpleNamespace

    param = torch.nn.Parameter(torch.zeros(2))
    if zero3:
        param.ds_numel, param.ds_tensor = 4, torch.zeros(2)
    trainer_like = SimpleNamespace(
        is_deepspeed_enabled=deepspeed,
        args=SimpleNamespace(device=torch.device(device)),
        model=SimpleNamespace(parameters=lambda: iter([param])),
    )
    assert compat.DeferredCheckpointWrites._gathered_to_host(trainer_like, {"w": torch.ones(1)}) is kept
    assert compat.DeferredCheckpointWrites._gathered_to_host(trainer_like, None) is False
