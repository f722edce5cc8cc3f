"""Held-out loss every ``train.eval_every_n_steps``: each rank its shard, one number for the run.

Every rank runs the same number of forward passes (ranks with fewer eval
batches run a batch that counts for nothing): under FSDP and ZeRO-3 a
forward pass gathers parameters with collectives, so an uneven count would
hang. The loss is summed per trained token and all-reduced, so it is the
mean over every eval token of the run, whatever the world size.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback

from sft_cluster.train import collectives

Batch = dict[str, torch.Tensor]


class EvalCallback(TrainerCallback):
    """Computes ``eval_loss`` at the chosen steps and at the last one; ``latest`` holds (step, loss)."""

    def __init__(
        self,
        batches: Callable[[], list[Batch]],
        every_n_steps: int,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ):
        """``batches()`` gives this rank's eval batches (at least one), built when first needed;
        ``on_event`` (and each ``listen``er) hears when each evaluation starts and ends (the run's
        events.jsonl; the watchdog's heartbeats)."""
        self._make_batches = batches
        self._listeners = [on_event] if on_event is not None else []
        self._batches: list[Batch] | None = None  # built at the first evaluation, then kept
        self.every_n_steps = every_n_steps
        self.trainer = None  # set after the Trainer exists: its model, device and autocast
        self.latest: tuple[int, float] | None = None

    def listen(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """``listener`` hears each evaluation's ``eval_started`` and ``eval_finished`` events too."""
        self._listeners.append(listener)

    def _emit(self, event: dict[str, Any]) -> None:
        for listener in self._listeners:
            listener(event)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.every_n_steps == 0 or step == state.max_steps:
            self._emit({"event": "eval_started", "step": step, "time": time.time()})
            self.latest = (step, self.evaluate())
            self._emit({"event": "eval_finished", "step": step, "time": time.time(), "loss": self.latest[1]})
            control.should_log = True  # the step's metrics record carries eval_loss
        return control

    @torch.no_grad()
    def evaluate(self) -> float:
        if self._batches is None:
            self._batches = self._make_batches()
        trainer = self.trainer
        model = trainer.model
        (count,) = collectives.reduce_numbers([len(self._batches)], "max")
        loss_sum = tokens = 0.0
        was_training = model.training
        model.eval()
        for index in range(int(count)):
            real = index < len(self._batches)  # else a stand-in pass that counts nothing
            batch = self._batches[index if real else -1]
            inputs = {key: value.to(trainer.args.device) for key, value in batch.items()}
            with trainer.accelerator.autocast():
                loss = model(**inputs).loss
            counted = int((inputs["labels"][..., 1:] != -100).sum()) if real else 0
            if counted:
                loss_sum += float(loss) * counted
                tokens += counted
        if was_training:
            model.train()
        loss_sum, tokens = collectives.reduce_numbers([loss_sum, tokens], "sum")
        return loss_sum / tokens if tokens else float("nan")
