"""Every place the worker leans on a library's private API or internal behaviour, in one package:
the general ones here, those of one concern in a module each (``checkpoint_writes``, ``fsdp_loading``,
``export``), all of them names of ``compat``.

Each function says why it is needed and what it relies on; all were checked on
torch 2.13.0, transformers 5.23.0, trl 1.16.0, accelerate 1.15.0, deepspeed
0.19.8 and peft 0.21.2. ``tests/unit/test_compat.py`` has one test per
workaround that fails, naming it and what to re-check, when an upgrade removes
or changes what it relies on. Imports stay inside the functions: the CLI
imports ``strategy`` (and so this module) without torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sft_cluster.train.compat.checkpoint_writes import DeferredCheckpointWrites, sharded_stager
from sft_cluster.train.compat.export import lora_layers, save_order, weight_conversions
from sft_cluster.train.compat.fsdp_loading import (
    as_if_loaded,
    scatter_shards_from_rank0,
    untouched_host_parameters,
)

__all__ = [
    "DeferredCheckpointWrites",
    "as_if_loaded",
    "lora_layers",
    "save_order",
    "scatter_shards_from_rank0",
    "sharded_stager",
    "untouched_host_parameters",
    "weight_conversions",
]

# --- torch -------------------------------------------------------------------------------------


def loader_generator(seed: int) -> Any:
    """A generator of the DataLoader's own, so creating its iterator leaves the global RNG alone.

    torch 2.13: ``_BaseDataLoaderIter.__init__`` draws ``_base_seed`` from
    ``loader.generator`` (the global RNG when None), even with num_workers=0. A
    resumed Trainer restores the global RNG from the checkpoint just before it
    creates the iterator, and that draw would shift every random number after it.
    """
    import torch

    return torch.Generator().manual_seed(seed)


def default_group_serves_cpu() -> bool:
    """Whether the default process group has a backend for CPU tensors.

    torch 2.13: ``dist.get_backend_config()`` is the ``BackendConfig`` repr,
    ``"device:backend"`` pairs joined by commas ("cpu:gloo,cuda:nccl"); a group
    made with ``"nccl"`` is ``"cuda:nccl"`` and cannot carry CPU control data.
    """
    import torch.distributed as dist

    config = str(dist.get_backend_config())
    return any(part.split(":")[0].strip() == "cpu" for part in config.split(","))


# --- accelerate --------------------------------------------------------------------------------


def deepspeed_env(on_gpu: bool) -> dict[str, str]:
    """The environment accelerate and DeepSpeed read to run DeepSpeed under the Trainer.

    accelerate 1.15: ``PartialState``/``AcceleratorState`` turn DEEPSPEED on from
    ``ACCELERATE_USE_DEEPSPEED`` (the shared state is made before the Trainer's
    arguments, see ``shared_state_for_deepspeed``). deepspeed 0.19.8: its
    accelerator is the one ``DS_ACCELERATOR`` names; ``cpu`` trains on CPU ranks.
    """
    env = {"ACCELERATE_USE_DEEPSPEED": "true"}
    if not on_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def force_deepspeed_cuda() -> None:
    """deepspeed 0.19.8 picks its accelerator from ``DS_ACCELERATOR`` first: an inherited ``cpu``
    (a CPU run's environment) would keep a GPU rank's tensors off the GPU."""
    os.environ["DS_ACCELERATOR"] = "cuda"


def shared_state_for_deepspeed(on_gpu: bool) -> None:
    """Make accelerate's shared state before the Trainer's arguments, for DeepSpeed to reuse.

    accelerate 1.15 + transformers 5.23: with ``accelerator_config={"use_configured_state":
    True}`` the TrainingArguments reuse a ``PartialState`` made before them instead of
    making their own. Made here (with ``ACCELERATE_USE_DEEPSPEED``) it is DEEPSPEED-typed and
    keeps the process group the launcher made: gloo on CPU, which DeepSpeed's own
    ``init_distributed`` would not pick.
    """
    from accelerate import PartialState

    PartialState(backend="nccl" if on_gpu else "gloo")


def route_cpu_fsdp() -> None:
    """Let accelerate enable FSDP on CPU ranks: mark the shared state MULTI_GPU (tensors stay on CPU).

    accelerate 1.15: ``AcceleratorState.__init__`` turns an ``fsdp_plugin`` into
    DistributedType.FSDP only when the shared ``PartialState`` is of a GPU type
    (MULTI_GPU, MULTI_NPU, ...); a CPU state with a gloo group would train
    unsharded. Set after the Trainer's arguments, before the Trainer builds its Accelerator.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide shared state (tests that build several setups in one process).

    accelerate 1.15: ``AcceleratorState``/``PartialState`` are borgs over
    ``_shared_state``; ``_reset_state`` is internal ("should not be called").
    """
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def align_local_rank(index: int) -> None:
    """Make LOCAL_RANK the index of this rank's GPU among the visible ones.

    accelerate 1.15 (``PartialState.local_process_index``, its NCCL barrier) and
    deepspeed 0.19.8 (``DeepSpeedEngine``'s device) index the device by
    LOCAL_RANK; under Ray Train a worker with several GPUs sees the node's GPUs
    and its device index differs from its local rank.
    """
    os.environ["LOCAL_RANK"] = str(index)


# --- transformers ------------------------------------------------------------------------------


def decoder_layer_class(config: Any) -> str:
    """The decoder-layer class name FSDP wraps, from a model config alone (no weights loaded).

    transformers 5.23: ``AutoModelForCausalLM._model_mapping`` maps a config
    class to its model class, whose ``_no_split_modules`` lists the layer
    classes that must stay whole (the decoder layer first).
    """
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    return list(model_class._no_split_modules)[0]


def set_attention(config: Any, implementation: str) -> None:
    """The attention a model built ``from_config`` uses.

    transformers 5.23: ``from_config`` reads ``config._attn_implementation``
    (a property over ``_attn_implementation_internal``).
    """
    config._attn_implementation = implementation


@contextmanager
def without_zero3_init() -> Iterator[None]:
    """Build a model whole even when the Trainer's arguments set up ZeRO-3.

    transformers 5.23: ``from_config``/``from_pretrained`` build under
    ``deepspeed.zero.Init`` while ``integrations.deepspeed._hf_deepspeed_config_weak_ref``
    points at a ZeRO-3 config; it is unset here and set back after. Under
    ``zero.Init`` a model built from a config draws its random weights per
    partition, so one seed would give other weights than under DDP or FSDP.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if ref is not None and ref() is not None:
            hf_deepspeed.set_hf_deepspeed_config(ref())


def set_up_devices(args: Any) -> None:
    """Set up the distributed state (process group, device) the Trainer's arguments describe.

    transformers 5.23: ``TrainingArguments.device`` is the cached
    ``_setup_devices``, which makes accelerate's ``PartialState`` as a side
    effect; the run needs the process group before the Trainer exists.
    """
    _ = args.device


def set_tensorboard_dir(folder: Path) -> None:
    """Where the Trainer's TensorBoard callback writes.

    transformers 5.23: ``TensorBoardCallback`` reads ``TENSORBOARD_LOGGING_DIR``
    (``TrainingArguments.logging_dir`` is gone in 5.x).
    """
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(folder)


def trainer_checkpoint_dir(output_dir: str, step: int) -> Path:
    """The folder the Trainer has just saved step ``step`` into when ``on_save`` is called.

    transformers 5.23: ``Trainer._save_checkpoint`` writes
    ``f"{PREFIX_CHECKPOINT_DIR}-{global_step}"`` in ``output_dir``, then calls ``on_save``.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


class StopAtMaxSteps:
    """Trainer mixin: a run resumed at its last step trains nothing more.

    transformers 5.23: ``_inner_training_loop`` calls the private ``_run_epoch``
    at least once, and one epoch trains a step even when ``global_step`` is
    already ``max_steps`` (resumed from the last checkpoint, ``final/`` missing).
    """

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)


def drop_tied_copy(model: Any, state_dict: dict[str, Any] | None) -> dict[str, Any] | None:
    """``state_dict`` without the output embedding's copy of tied input embeddings.

    transformers 5.23: ``save_pretrained(state_dict=...)`` writes every key it
    is given; a state dict gathered from FSDP2 holds tied embeddings as two
    tensors, which a tied model saves (and loads) as one.
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if state_dict is None or output is None or not model.config.get_text_config().tie_word_embeddings:
        return state_dict
    key = next((f"{name}.weight" for name, module in model.named_modules() if module is output), None)
    return {name: tensor for name, tensor in state_dict.items() if name != key}


# --- trl ---------------------------------------------------------------------------------------


def placeholder_dataset() -> Any:
    """What SFTTrainer gets as ``train_dataset``; the trainer's stream replaces it after.

    trl 1.16: ``SFTTrainer.__init__`` accepts only ``datasets`` types and peeks
    at a sample (``next(iter(train_dataset))``); with ``dataset_kwargs=
    {"skip_prepare_dataset": True}`` it does nothing else with it.
    """
    import datasets

    return datasets.Dataset.from_list([{"input_ids": [0], "labels": [-100]}])


# --- deepspeed ---------------------------------------------------------------------------------


def zero3_full_state_dict(engine: Any) -> dict[str, Any]:
    """The whole model's state dict from a ZeRO-3 engine (collective; the main process gets it).

    deepspeed 0.19.8: ``DeepSpeedEngine._zero3_consolidated_16bit_state_dict``
    gathers the partitions whatever ``stage3_gather_16bit_weights_on_model_save``
    says (that option is about intermediate checkpoints; ``final/`` is always whole).
    """
    return engine._zero3_consolidated_16bit_state_dict()


def zero3_partition(param: Any) -> tuple[int, int] | None:
    """(elements this rank holds, elements in all) of a ZeRO-3 parameter; None for any other.

    deepspeed 0.19.8: ``zero.Init`` gives each parameter ``ds_numel`` (the full
    size) and ``ds_tensor`` (this rank's partition).
    """
    if not hasattr(param, "ds_numel"):
        return None
    return param.ds_tensor.numel(), param.ds_numel


# --- peft --------------------------------------------------------------------------------------


def lora_copy(base: Any, trained: Any, state_dict: dict[str, Any]) -> Any:
    """A fresh PEFT model of ``base`` with the trained adapter's weights (for merging, unsharded).

    peft 0.21.2: ``get_peft_model`` names the adapter ``"default"``, and a PEFT
    model's state dict (gathered from the training copy) loads into another one
    made with the same config, key for key.
    """
    from peft import get_peft_model

    copy = get_peft_model(base, trained.peft_config["default"])
    copy.load_state_dict(state_dict)
    return copy
