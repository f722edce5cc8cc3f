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
    state dict. ``deferred_writes()`` (the subclass's) says where the writes go, or None to write
    at once; it must first see the previous save's writes done, as the next copy refills the host
    tensors of the last one. DeepSpeed, FSDP and PEFT models always save as the Trainer does.
    """

    _deferred: Any = None  # the save in progress's DeferredWrites
    _host_buffers: dict[str, Any] | None = None  # the host tensors of the last copy, filled again

    def deferred_writes(self) -> Any:
        return None

    def _buffers(self) -> dict[str, Any]:
        if self._host_buffers is None:
            self._host_buffers = {}
        return self._host_buffers

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
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

        if self._deferred is None or not self.args.should_save or not isinstance(self.model, PreTrainedModel):
            return super()._save(output_dir, state_dict)
        os.makedirs(output_dir, exist_ok=True)  # the small files of the save go in now
        copy = host_copy(
            self.model.state_dict() if state_dict is None else state_dict, self._buffers(), "model"
        )
        self._deferred.add(partial(super()._save, output_dir, copy))
        return None

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        from functools import partial

        import torch
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        from sft_cluster.train.snapshot import host_copy

        if self._deferred is None or not self.args.should_save:
            return super()._save_optimizer_and_scheduler(output_dir)
        optimizer = host_copy(self.optimizer.state_dict(), self._buffers(), "optimizer")
        self._deferred.add(partial(torch.save, optimizer, os.path.join(output_dir, OPTIMIZER_NAME)))
        torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))  # small
        return None
