"""Loading from rank 0 under FSDP2 (issue #17.5): the plan, the placeholder model, and the checks
that fail naming the compat workaround when an upgrade changes what it relies on (as in
test_compat.py). The 2-rank load itself is tests/integration/test_fsdp_loading.py.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from sft_cluster.spec import ModelSpec, load_job, resolve_builtin
from sft_cluster.train import compat
from sft_cluster.train.model import build_model
from sft_cluster.train.strategy import builds_weights, plan_strategy
from tests.conftest import REPO
from tests.unit.test_compat import recheck

SMOKE = str(REPO / "jobs" / "smoke.yaml")


@pytest.mark.parametrize(
    "overrides,loads_from_rank0",
    [
        (["strategy.kind=fsdp"], True),
        (["strategy.kind=fsdp", "strategy.fsdp.version=1", "resources.gpus_per_worker=1"], False),
        (["strategy.kind=ddp"], False),
        (["strategy.kind=deepspeed", "strategy.deepspeed.stage=3"], False),
    ],
)
def test_only_fsdp2_loads_on_rank0_alone(overrides, loads_from_rank0):
    plan = plan_strategy(load_job(SMOKE, overrides), world_size=2, precision="fp32", on_gpu=False)
    if plan.kind == "fsdp":
        assert plan.trainer_args["fsdp_config"]["cpu_ram_efficient_loading"] is loads_from_rank0
    assert builds_weights(plan, 0)
    assert builds_weights(plan, 1) is not loads_from_rank0


@pytest.mark.parametrize("from_config", [False, True])
@pytest.mark.parametrize("tied", [True, False])
def test_placeholder_model_is_the_plain_model_without_its_values(tmp_path, from_config, tied):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(resolve_builtin("builtin:tiny-llama"))
    config.tie_word_embeddings = tied
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(resolve_builtin("builtin:tiny-llama")).save_pretrained(tmp_path)
    spec = ModelSpec(name_or_path=str(tmp_path), from_config=from_config)
    plain = build_model(spec, seed=3, vocab_size=700)  # grown, as for a template's tokens
    empty = build_model(spec, seed=3, vocab_size=700, weights=False)
    assert type(empty) is type(plain) and empty.config.to_dict() == plain.config.to_dict()
    assert [n for n, _ in empty.named_parameters()] == [n for n, _ in plain.named_parameters()]
    shapes = {k: (v.shape, v.dtype) for k, v in plain.state_dict().items()}
    assert {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()} == shapes
    assert (empty.lm_head.weight is empty.model.embed_tokens.weight) is tied
    # What the export reads, collectively, agrees with rank 0's model.
    assert getattr(empty, "_weight_conversions", None) == getattr(plain, "_weight_conversions", None)
    names = list(plain.state_dict())
    assert compat.save_order(empty, names) == compat.save_order(plain, names)
    assert compat.weight_conversions(empty) == compat.weight_conversions(plain)
    assert {p.device.type for p in empty.parameters()} == {"cpu"}
    # Buffers are not broadcast: they are computed, as in the plain model.
    for (name, buffer), (_, expected) in zip(empty.named_buffers(), plain.named_buffers(), strict=True):
        assert torch.equal(buffer, expected), name


def test_untouched_host_parameters_keeps_ties_flags_and_distinct_pointers():
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_builtin("builtin:tiny-llama"))
    config.tie_word_embeddings = True
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    model.model.norm.weight.requires_grad_(False)
    compat.untouched_host_parameters(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.model.norm.weight.requires_grad
    pointers = [p.data_ptr() for p in model.parameters()]
    assert 0 not in pointers and len(set(pointers)) == len(pointers)


def test_accelerate_maps_the_optimizer_by_data_ptr():
    from accelerate import Accelerator

    source = inspect.getsource(Accelerator._prepare_fsdp2)
    assert "data_ptr" in source, recheck(
        "untouched_host_parameters",
        "Accelerator._prepare_fsdp2 no longer maps the optimizer by data_ptr (meta parameters may do now)",
    )


def test_accelerate_loads_through_the_module_function_and_torch_scatters_from_rank0():
    from accelerate.utils import fsdp_utils
    from torch.distributed.tensor import distribute_tensor

    source = inspect.getsource(fsdp_utils.fsdp2_prepare_model)
    assert "fsdp2_load_full_state_dict(\n" in source and "cpu_offload=" in source, recheck(
        "scatter_shards_from_rank0",
        "fsdp2_prepare_model no longer calls its module's fsdp2_load_full_state_dict",
    )
    expected = ["accelerator", "model", "full_sd", "cpu_offload"]
    assert list(inspect.signature(fsdp_utils.fsdp2_load_full_state_dict).parameters) == expected, recheck(
        "scatter_shards_from_rank0", "fsdp2_load_full_state_dict's signature changed"
    )
    default = inspect.signature(distribute_tensor).parameters["src_data_rank"].default
    assert default == 0, recheck(
        "scatter_shards_from_rank0", "distribute_tensor no longer scatters from rank 0"
    )
