"""The accelerate/DeepSpeed settings generated from the job's strategy section."""

from __future__ import annotations

import json

import pytest

from sft_cluster.spec import SpecError, load_job
from sft_cluster.train.strategy import describe_strategy, plan_strategy
from tests.conftest import REPO, run_cli

SMOKE = str(REPO / "jobs" / "smoke.yaml")


def _job(*overrides: str):
    return load_job(SMOKE, list(overrides))


def test_deepspeed_batch_fields_are_derived_from_one_place():
    job = _job("strategy.kind=deepspeed", "train.micro_batch_size=3", "train.grad_accum_steps=5")
    config = plan_strategy(job, world_size=8, precision="bf16", on_gpu=True).deepspeed
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 5
    assert config["train_batch_size"] == 3 * 5 * 8
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert config["gradient_clipping"] == job.train.max_grad_norm
    assert config["zero_optimization"]["stage"] == 2
    assert "offload_optimizer" not in config["zero_optimization"]


def test_zero3_offload_and_gather_options():
    job = _job(
        "strategy.kind=deepspeed",
        "strategy.deepspeed.stage=3",
        "strategy.deepspeed.offload_optimizer=true",
        "strategy.deepspeed.offload_params=true",
        "strategy.deepspeed.gather_16bit_weights_on_save=false",
        "resources.gpus_per_worker=1",
    )
    plan = plan_strategy(job, world_size=2, precision="bf16", on_gpu=True)
    zero = plan.deepspeed["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["stage3_gather_16bit_weights_on_model_save"] is False
    assert plan.trainer_args["accelerator_config"] == {"use_configured_state": True}
    assert plan.env == {"ACCELERATE_USE_DEEPSPEED": "true"}  # on GPU DeepSpeed picks CUDA itself


def test_fsdp2_wraps_the_models_decoder_layer_and_owns_activation_checkpointing():
    job = _job(
        "strategy.kind=fsdp", "strategy.activation_checkpointing=true", "strategy.fsdp.state_dict=full"
    )
    args = plan_strategy(job, world_size=2, precision="fp32", on_gpu=False).trainer_args
    assert args["fsdp"] == "full_shard auto_wrap"
    assert args["fsdp_config"]["version"] == 2
    assert args["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert args["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"
    assert args["fsdp_config"]["activation_checkpointing"] is True
    assert args["gradient_checkpointing"] is False  # FSDP does it per wrapped layer instead


def test_ddp_needs_no_plugin_and_auto_precision_is_fp32_on_cpu():
    record = describe_strategy(_job())
    assert record["kind"] == "ddp" and record["deepspeed"] is None
    assert record["accelerate"] == {
        "gradient_checkpointing": False,
        "use_liger_kernel": False,
        "torch_compile": False,
    }
    gpu = describe_strategy(
        _job("strategy.kind=deepspeed", "strategy.precision=auto", "resources.gpus_per_worker=1")
    )
    assert gpu["deepspeed"]["bf16"] == {"enabled": True}


def test_lora_settings_for_peft():
    record = describe_strategy(_job("strategy.lora.r=4", "strategy.lora.alpha=8", "strategy.lora.merge=true"))
    assert record["lora"] == {
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.05,
        "target_modules": "all-linear",
        "task_type": "CAUSAL_LM",
    }


def test_invalid_combination_is_a_spec_error_with_the_reason():
    with pytest.raises(SpecError, match="FSDP1 does not run on CPU"):
        _job("strategy.kind=fsdp", "strategy.fsdp.version=1")


def test_run_dry_run_prints_the_generated_deepspeed_config(isolated_env):
    result = run_cli(
        [
            "run",
            "jobs/smoke.yaml",
            "strategy.kind=deepspeed",
            "train.grad_accum_steps=2",
            "--dry-run",
        ],
        isolated_env,
    )
    assert result.returncode == 0, result.stderr
    printed = result.stdout.split("# strategy.json (generated from the job's strategy section)\n", 1)[1]
    record = json.loads(printed)
    assert record["deepspeed"]["train_batch_size"] == 4 * 2 * 2
    assert record["world_size"] == 2
