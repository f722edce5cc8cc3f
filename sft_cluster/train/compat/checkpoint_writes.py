"""The Trainer's checkpoint writes taken off the step (issue #17.1): see ``DeferredCheckpointWrites``."""

from __future__ import annotations

import os
from typing import Any


class DeferredCheckpointWrites:
    """Trainer mixin: a checkpoint's model weights and optimizer state are written from host copies
    after the step, in the layout the Trainer writes and loads (``sft_cluster.train.snapshot``).

    transformers 5.23: ``_save_checkpoint`` writes the weights through ``save_model`` ->
    ``_save(output_dir)`` (``save_pretrained``, the tokenizer, ``training_args.bin``) and the
    optimizer and scheduler through ``_save_optimizer_and_scheduler`` (``torch.save`` of their state
    dicts as ``optimizer.pt``, ``scheduler.pt``); without DeepSpeed or FSDP only ``args.should_save``
    ranks write either, and ``_save(output_dir, state_dict)`` writes the same files from a given
    state dict. With FSDP2 and ``SHARDED_STATE_DICT`` ``save_model`` writes nothing and
    ``_save_optimizer_and_scheduler`` has accelerate write the model and the optimizer with DCP, every
    rank its shards (``save_fsdp_model``: ``pytorch_model_fsdp_0/`` with ``{"model": ...}``;
    ``save_fsdp_optimizer``: ``optimizer_0/`` with ``{"optimizer": ...}``), which
    ``snapshot.staged_sharded_save`` writes alike. ``deferred_writes()`` (the subclass's) says where
    the writes go, or None to write at once; it must first see the previous save's writes done, as
    the next copy refills the host tensors of the last one. With DeepSpeed, ``_save_optimizer_and_scheduler``
    has the engine's ``save_checkpoint`` write every file through its checkpoint engine, whose ``save``
    is deferred the same way (``DeferredEngineSaves``). FSDP1, FSDP's full state dict and PEFT
    weights always save as the Trainer does.
    """

    _deferred: Any = None  # the save in progress's DeferredWrites
    _host_buffers: dict[str, Any] | None = None  # the host tensors of the last copy, filled again
    _stager: Any = None  # FSDP2: DCP's stager, which keeps and refills its host copy the same way

    def deferred_writes(self) -> Any:
        return None

    def _buffers(self) -> dict[str, Any]:
        if self._host_buffers is None:
            self._host_buffers = {}
        return self._host_buffers

    def _sharded_fsdp2(self) -> bool:
        from accelerate.utils import is_peft_model
        from torch.distributed.fsdp.fully_sharded_data_parallel import StateDictType

        plugin = self.accelerator.state.fsdp_plugin
        return (
            plugin.fsdp_version == 2
            and plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
            and not is_peft_model(self.accelerator.unwrap_model(self.model))
        )

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.is_fsdp_enabled and not self._sharded_fsdp2():
            return super()._save_checkpoint(model, trial)
        self._deferred = self.deferred_writes()
        try:
            return super()._save_checkpoint(model, trial)
        finally:
            self._deferred = None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        from functools import partial

        from transformers import PreTrainedModel

        from sft_cluster.train.snapshot import host_copy

        dummy = state_dict is not None and not state_dict  # DeepSpeed's, removed right after it is written
        if (
            self._deferred is None
            or dummy
            or not self.args.should_save
            or not isinstance(self.model, PreTrainedModel)
        ):
            return super()._save(output_dir, state_dict)
        os.makedirs(output_dir, exist_ok=True)  # the small files of the save go in now
        if self._gathered_to_host(state_dict):
            copy = state_dict  # held until written, as the Trainer held it while writing
        else:
            copy = host_copy(
                self.model.state_dict() if state_dict is None else state_dict, self._buffers(), "model"
            )
        self._deferred.add(partial(super()._save, output_dir, copy))
        return None

    def _gathered_to_host(self, state_dict: dict | None) -> bool:
        """ZeRO-3 on a GPU: the weights are DeepSpeed's consolidated state dict, already a host copy
        of its own (``_zero3_consolidated_16bit_state_dict`` moves each gathered tensor to the CPU);
        copying it again would keep a whole model in host memory for the run. On the CPU its tensors
        may be the gathered storage itself, so it is copied."""
        from sft_cluster.train import compat

        return (
            state_dict is not None
            and self.is_deepspeed_enabled
            and self.args.device.type == "cuda"
            and compat.zero3_partition(next(self.model.parameters())) is not None
        )

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        from functools import partial

        import torch
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        from sft_cluster.train.snapshot import host_copy, staged_sharded_save

        if self._deferred is not None and self.is_deepspeed_enabled:  # every rank: its own files
            engine = self.model_wrapped
            engine.checkpoint_engine = DeferredEngineSaves(
                engine.checkpoint_engine, self._deferred, self._buffers()
            )
            try:
                return super()._save_optimizer_and_scheduler(output_dir)
            finally:
                engine.checkpoint_engine = engine.checkpoint_engine.engine
        if self._deferred is not None and self.is_fsdp_enabled:  # every rank: its own shards
            os.makedirs(output_dir, exist_ok=True)  # save_fsdp_model made it; the scheduler goes in now
            if self._stager is None:
                self._stager = sharded_stager(pinned=self.args.device.type == "cuda")
            self._deferred.add(staged_sharded_save(self.model, self.optimizer, output_dir, self._stager))
        elif self._deferred is None or not self.args.should_save:
            return super()._save_optimizer_and_scheduler(output_dir)
        else:
            optimizer = host_copy(self.optimizer.state_dict(), self._buffers(), "optimizer")
            self._deferred.add(partial(torch.save, optimizer, os.path.join(output_dir, OPTIMIZER_NAME)))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))  # small
        return None


class DeferredEngineSaves:
    """A DeepSpeed checkpoint engine whose ``save(state_dict, path)`` copies the state to host memory
    and leaves the file to ``deferred``; everything else is the wrapped ``engine``'s.

    deepspeed 0.19: ``save_checkpoint`` writes the model states (rank 0; under ZeRO-3 every rank its
    partition) and each rank's optimizer partition with ``checkpoint_engine.save`` and only the
    ``latest`` tag and the recovery script directly, which stay on the step (small). The host
    tensors are kept per file name (``buffers``), so the next save refills them.
    """

    def __init__(self, engine: Any, deferred: Any, buffers: dict[str, Any]):
        self.engine = engine
        self._deferred = deferred
        self._buffers = buffers

    def save(self, state_dict: Any, path: str) -> None:
        from functools import partial

        from sft_cluster.train.snapshot import host_copy

        copy = host_copy(state_dict, self._buffers, f"deepspeed/{os.path.basename(path)}")
        self._deferred.add(partial(self.engine.save, copy, path))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def sharded_stager(pinned: bool) -> Any:
    """DCP's stager for FSDP2 saves: a blocking copy on the step (the write waits for the upload
    thread), host storages kept per live storage and filled again by the next save; pinned host
    memory on a GPU for the device-to-host copy.

    torch 2.13: ``DefaultStager`` with ``StagingOptions``; ``use_non_blocking_copy`` needs an
    accelerator, ``use_shared_memory`` is for a separate writer process.
    """
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    return DefaultStager(
        StagingOptions(
            use_pinned_memory=pinned,
            use_shared_memory=False,
            use_async_staging=False,
            use_non_blocking_copy=False,
        )
    )
