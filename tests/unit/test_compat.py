"""One check per workaround in ``sft_cluster.train.compat``: each fails, naming the workaround and what
to re-check, when an upgrade of torch, transformers, trl, accelerate, deepspeed or peft removes or
changes the private API or internal behaviour it relies on. Cheap: tiny models, no training;
DeepSpeed is read as source, never imported.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sft_cluster.spec import resolve_builtin
from sft_cluster.train import compat

TINY = resolve_builtin("builtin:tiny-llama")


def recheck(workaround: str, what: str) -> str:
    """The failure message: which workaround, and what changed under it."""
    return (
        f"compat.{workaround}: {what}. An upgrade changed what this workaround relies on: re-check it "
        "(its docstring says why it exists) and update the versions it names"
    )


def deepspeed_source(relative: str) -> str:
    """A DeepSpeed module's text, found without importing DeepSpeed (slow, and picks an accelerator)."""
    spec = importlib.util.find_spec("deepspeed")
    assert spec is not None and spec.submodule_search_locations, "deepspeed is not installed"
    return (Path(next(iter(spec.submodule_search_locations))) / relative).read_text()


def method_source(cls: type, name: str) -> str:
    assert hasattr(cls, name), f"{cls.__name__}.{name} is gone: re-check the compat workaround that names it"
    return inspect.getsource(getattr(cls, name))


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's shared state empty before and after the test."""
    compat.reset_accelerate_state()
    yield
    compat.reset_accelerate_state()


def accelerator_state(**plugins):
    """The AcceleratorState an Accelerator would make (accelerate lets only an Accelerator make one)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import TorchDynamoPlugin

    return AcceleratorState(dynamo_plugin=TorchDynamoPlugin(), _from_accelerator=True, **plugins)


def tiny_model(**config_changes):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(TINY)
    for name, value in config_changes.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


# --- torch -------------------------------------------------------------------------------------


def test_loader_generator_keeps_the_global_rng_out_of_the_loader():
    generator = compat.loader_generator(7)
    before, own_before = torch.random.get_rng_state(), generator.get_state()
    iter(torch.utils.data.DataLoader([1, 2, 3], generator=generator, num_workers=0))
    assert torch.equal(torch.random.get_rng_state(), before), recheck(
        "loader_generator", "creating a DataLoader iterator with its own generator drew from the global RNG"
    )
    assert not torch.equal(generator.get_state(), own_before), recheck(
        "loader_generator", "the DataLoader iterator no longer draws its base seed from loader.generator"
    )


@pytest.mark.parametrize(("backend", "serves"), [("gloo", True), ("cuda:gloo", False)])
def test_default_group_serves_cpu_reads_the_backend_config(tmp_path, backend, serves):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        config = dist.get_backend_config()
        assert compat.default_group_serves_cpu() is serves, recheck(
            "default_group_serves_cpu", f"dist.get_backend_config() of a {backend!r} group reads {config!r}"
        )
    finally:
        dist.destroy_process_group()


# --- accelerate --------------------------------------------------------------------------------


def test_deepspeed_env_is_what_accelerate_and_deepspeed_read():
    from accelerate.state import AcceleratorState, PartialState

    env = compat.deepspeed_env(on_gpu=False)
    for cls in (PartialState, AcceleratorState):
        assert 'os.environ.get("ACCELERATE_USE_DEEPSPEED"' in method_source(cls, "__init__"), recheck(
            "deepspeed_env", f"accelerate's {cls.__name__}.__init__ no longer reads ACCELERATE_USE_DEEPSPEED"
        )
    source = deepspeed_source("accelerator/real_accelerator.py")
    assert '"DS_ACCELERATOR" in os.environ' in source and "'cpu'" in source, recheck(
        "deepspeed_env", "DeepSpeed no longer picks its accelerator from DS_ACCELERATOR (cpu)"
    )
    assert env == {"ACCELERATE_USE_DEEPSPEED": "true", "DS_ACCELERATOR": "cpu"}


def test_force_deepspeed_cuda_names_an_accelerator_deepspeed_takes(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    compat.force_deepspeed_cuda()
    source = deepspeed_source("accelerator/real_accelerator.py")
    listed = ast.literal_eval(source.split("SUPPORTED_ACCELERATOR_LIST = ", 1)[1].split("\n", 1)[0])
    assert "cuda" in listed and '"DS_ACCELERATOR" in os.environ' in source, recheck(
        "force_deepspeed_cuda", f"DeepSpeed's accelerators are {listed}, or DS_ACCELERATOR is no longer read"
    )


def test_shared_state_made_before_the_arguments_is_reused(tmp_path, fresh_accelerate_state):
    from accelerate import PartialState
    from transformers import TrainingArguments

    assert 'kwargs.pop("backend"' in method_source(PartialState, "__init__"), recheck(
        "shared_state_for_deepspeed", "PartialState no longer takes backend="
    )
    PartialState(cpu=True)
    PartialState._shared_state["made_before"] = True
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, accelerator_config={"use_configured_state": True}
    )
    compat.set_up_devices(args)
    assert PartialState._shared_state.get("made_before"), recheck(
        "shared_state_for_deepspeed",
        "TrainingArguments with use_configured_state=True no longer reuse the PartialState made before them",
    )


def test_route_cpu_fsdp_turns_a_cpu_state_into_fsdp(fresh_accelerate_state):
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    PartialState(cpu=True)
    compat.route_cpu_fsdp()
    state = accelerator_state(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    assert state.distributed_type == DistributedType.FSDP, recheck(
        "route_cpu_fsdp", f"a MULTI_GPU-marked CPU state with an FSDP plugin became {state.distributed_type}"
    )
    assert str(state.device) == "cpu"


def test_reset_accelerate_state_empties_the_shared_state():
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    PartialState(cpu=True)
    accelerator_state()
    compat.reset_accelerate_state()
    assert PartialState._shared_state == {} and AcceleratorState._shared_state == {}, recheck(
        "reset_accelerate_state", "_reset_state no longer empties accelerate's shared state"
    )


def test_local_rank_is_what_accelerate_and_deepspeed_index_the_device_by(monkeypatch):
    from accelerate import PartialState

    monkeypatch.setenv("LOCAL_RANK", "0")
    compat.align_local_rank(3)
    assert os.environ["LOCAL_RANK"] == "3"
    assert 'int(os.environ.get("LOCAL_RANK", -1))' in method_source(PartialState, "__init__"), recheck(
        "align_local_rank", "accelerate's PartialState no longer takes local_process_index from LOCAL_RANK"
    )
    assert "self.local_rank = int(os.environ['LOCAL_RANK'])" in deepspeed_source("runtime/engine.py"), (
        recheck("align_local_rank", "DeepSpeedEngine no longer takes its device index from LOCAL_RANK")
    )


# --- transformers ------------------------------------------------------------------------------


def test_decoder_layer_class_comes_from_the_config_alone():
    from transformers import AutoConfig

    found = compat.decoder_layer_class(AutoConfig.from_pretrained(TINY))
    assert found == "LlamaDecoderLayer", recheck(
        "decoder_layer_class", f"AutoModelForCausalLM._model_mapping / _no_split_modules gave {found!r}"
    )


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_set_attention_reaches_a_model_built_from_config(implementation):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(TINY)
    compat.set_attention(config, implementation)
    model = AutoModelForCausalLM.from_config(config)
    used = model.model.layers[0].self_attn.config._attn_implementation
    assert used == implementation, recheck("set_attention", f"config._attn_implementation gave {used!r}")


def test_without_zero3_init_hides_and_restores_the_zero3_config():
    from transformers import PreTrainedModel
    from transformers.integrations import deepspeed as hf_deepspeed

    class Zero3:
        def is_zero3(self) -> bool:
            return True

    config = Zero3()
    assert "is_deepspeed_zero3_enabled()" in method_source(PreTrainedModel, "_from_config"), recheck(
        "without_zero3_init", "from_config no longer asks is_deepspeed_zero3_enabled() before zero.Init"
    )
    hf_deepspeed.set_hf_deepspeed_config(config)
    try:
        with compat.without_zero3_init():
            hidden = hf_deepspeed.is_deepspeed_zero3_enabled()
        assert not hidden and hf_deepspeed.is_deepspeed_zero3_enabled(), recheck(
            "without_zero3_init",
            "integrations.deepspeed._hf_deepspeed_config_weak_ref no longer decides ZeRO-3",
        )
        assert hf_deepspeed._hf_deepspeed_config_weak_ref() is config
        assert isinstance(hf_deepspeed._hf_deepspeed_config_weak_ref, weakref.ref)
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()


def test_set_up_devices_makes_the_distributed_state(tmp_path, fresh_accelerate_state):
    from accelerate import PartialState
    from transformers import TrainingArguments

    compat.set_up_devices(TrainingArguments(output_dir=str(tmp_path), use_cpu=True))
    assert PartialState._shared_state != {}, recheck(
        "set_up_devices", "TrainingArguments.device no longer sets up accelerate's PartialState"
    )


def test_set_tensorboard_dir_is_where_the_tensorboard_callback_writes(monkeypatch, tmp_path):
    from transformers.integrations import TensorBoardCallback

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    compat.set_tensorboard_dir(tmp_path / "tb")
    try:
        found = TensorBoardCallback().logging_dir
    finally:
        monkeypatch.delenv("TENSORBOARD_LOGGING_DIR")
    assert found == str(tmp_path / "tb"), recheck(
        "set_tensorboard_dir", f"TensorBoardCallback writes to {found!r}, not TENSORBOARD_LOGGING_DIR"
    )


def test_trainer_checkpoint_dir_is_saved_before_on_save():
    from transformers import Trainer

    save = method_source(Trainer, "_save_checkpoint")
    assert 'f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"' in save, recheck(
        "trainer_checkpoint_dir", "Trainer._save_checkpoint names its folder otherwise"
    )
    flow = method_source(Trainer, "_maybe_log_save_evaluate")
    assert -1 < flow.find("self._save_checkpoint(") < flow.find(".on_save("), recheck(
        "trainer_checkpoint_dir", "on_save is no longer called after Trainer._save_checkpoint"
    )
    assert compat.trainer_checkpoint_dir("/x", 12) == Path("/x/checkpoint-12")


def test_stop_at_max_steps_overrides_what_the_training_loop_calls():
    from transformers import Trainer

    from sft_cluster.train.trainer import StreamingSFTTrainer

    assert "_inner_training_loop" in method_source(Trainer, "train"), recheck(
        "StopAtMaxSteps", "Trainer.train no longer runs _inner_training_loop"
    )
    loop = method_source(Trainer, "_inner_training_loop")
    assert "self._run_epoch(" in loop and "should_training_stop" in loop, recheck(
        "StopAtMaxSteps", "_inner_training_loop no longer trains through self._run_epoch"
    )
    assert StreamingSFTTrainer._run_epoch is compat.StopAtMaxSteps._run_epoch
    done = SimpleNamespace(
        state=SimpleNamespace(global_step=20, max_steps=20),
        control=SimpleNamespace(should_training_stop=False),
    )
    assert compat.StopAtMaxSteps._run_epoch(done) is None and done.control.should_training_stop


def test_drop_tied_copy_saves_tied_embeddings_once(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    gathered = {name: tensor.clone() for name, tensor in model.state_dict().items()}  # as FSDP2 gives them
    assert "lm_head.weight" in gathered
    dropped = compat.drop_tied_copy(model, gathered)
    assert "lm_head.weight" not in dropped and len(dropped) == len(gathered) - 1
    model.save_pretrained(str(tmp_path), state_dict=dropped, safe_serialization=True)
    loaded, info = AutoModelForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], recheck("drop_tied_copy", str(info))
    assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight), recheck(
        "drop_tied_copy", "a tied model saved without the output embedding's key no longer loads it tied"
    )


# --- trl ---------------------------------------------------------------------------------------


def test_placeholder_dataset_is_all_sft_trainer_reads_of_it():
    from transformers import Trainer
    from trl import SFTConfig, SFTTrainer

    init = method_source(SFTTrainer, "__init__")
    wanted = {
        "model",
        "args",
        "train_dataset",
        "data_collator",
        "processing_class",
        "callbacks",
        "peft_config",
    }
    missing = wanted - set(inspect.signature(SFTTrainer.__init__).parameters)
    assert not missing, recheck("placeholder_dataset", f"SFTTrainer takes no {sorted(missing)}")
    assert '"skip_prepare_dataset"' in init and "dataset_kwargs" in SFTConfig.__dataclass_fields__, recheck(
        "placeholder_dataset", "SFTTrainer no longer skips dataset preparation on skip_prepare_dataset"
    )
    assert "self.get_train_dataloader()" in method_source(Trainer, "_inner_training_loop"), recheck(
        "placeholder_dataset", "the training loop no longer gets its data from get_train_dataloader"
    )
    assert compat.placeholder_dataset().column_names == ["input_ids", "labels"]


# --- deepspeed ---------------------------------------------------------------------------------


def test_zero3_full_state_dict_calls_a_method_the_engine_has():
    tree = ast.parse(deepspeed_source("runtime/engine.py"))
    engine = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DeepSpeedEngine")
    method = next(
        (
            n
            for n in engine.body
            if isinstance(n, ast.FunctionDef) and n.name == "_zero3_consolidated_16bit_state_dict"
        ),
        None,
    )
    assert method is not None, recheck("zero3_full_state_dict", "DeepSpeedEngine has no such method")
    required = len(method.args.args) - 1 - len(method.args.defaults)
    assert required == 0, recheck("zero3_full_state_dict", "it now needs arguments")
    engine_stub = SimpleNamespace(_zero3_consolidated_16bit_state_dict=lambda: {"w": 1})
    assert compat.zero3_full_state_dict(engine_stub) == {"w": 1}


def test_zero3_partition_reads_the_attributes_zero_init_sets():
    source = deepspeed_source("runtime/zero/partition_parameters.py")
    assert "param.ds_numel = " in source and "param.ds_tensor = " in source, recheck(
        "zero3_partition", "zero.Init no longer sets ds_numel / ds_tensor on its parameters"
    )
    assert compat.zero3_partition(torch.nn.Parameter(torch.zeros(4))) is None
    partitioned = SimpleNamespace(ds_numel=8, ds_tensor=torch.zeros(2))
    assert compat.zero3_partition(partitioned) == (2, 8)


# --- peft --------------------------------------------------------------------------------------


def test_lora_copy_takes_the_trained_adapter_key_for_key():
    from peft import LoraConfig, get_peft_model

    trained = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert list(trained.peft_config) == ["default"], recheck(
        "lora_copy", f"get_peft_model named its adapter {list(trained.peft_config)}, not 'default'"
    )
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)
    state = trained.state_dict()
    copy = compat.lora_copy(tiny_model(), trained, state)
    assert all(torch.equal(copy.state_dict()[key], value) for key, value in state.items()), recheck(
        "lora_copy", "a PEFT model's state dict no longer loads key for key into a fresh copy"
    )
