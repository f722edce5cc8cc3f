"""Trainer callbacks: metrics on rank 0 and live progress for the driver."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from sft_cluster.tracking import JsonlLog
from sft_cluster.train.progress import ProgressSink


class ProgressCallback(TrainerCallback):
    """Turns Trainer logs into ``metrics.jsonl`` records and progress events.

    Only the world's process zero writes; the loss the Trainer logs is already
    averaged over all ranks.
    """

    def __init__(
        self,
        metrics: JsonlLog | None,
        sink: ProgressSink,
        max_steps: int,
        eval_loss: Callable[[], tuple[int, float] | None] = lambda: None,
        epoch_of: Callable[[int], float | None] = lambda step: None,
        data_wait: Callable[[], float] = lambda: 0.0,
        world_size: int = 1,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
    ):
        """``eval_loss()`` is the latest (step, eval loss), added to that step's record;
        ``epoch_of(step)`` the fractional epoch (``train.epochs`` jobs), added to every record;
        ``data_wait()`` the seconds this rank has waited for its rows so far: each record gets
        ``data_wait_s``, the mean wait per step since the previous record. Every record gets
        ``tokens_per_second_per_device`` (the Trainer's token count is over all ``world_size``
        ranks), and ``mfu`` where both ``flops_per_token`` and the device's ``peak_flops`` are known
        (``sft_cluster.train.flops``; not on the CPU). ``checkpoint_s`` is the time the steps since the
        previous record stood still for checkpoints (from the end of the step saved to the start of
        the next), for the goodput report."""
        self.metrics = metrics
        self.eval_loss = eval_loss
        self.sink = sink
        self.max_steps = max_steps
        self.epoch_of = epoch_of
        self.data_wait = data_wait
        self.world_size = world_size
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.first_step_time: float | None = None
        self._step_ended = 0.0
        self._saving = False  # a checkpoint was saved after the step that ended last
        self._checkpoint_s = 0.0  # steps stalled for checkpoints since the previous record
        self._last: tuple[float, float] | None = None  # (time, tokens) at the previous log
        self._waited: tuple[int, float] = (0, 0.0)  # (step, data wait so far) at the previous log

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self._waited = (state.global_step, self.data_wait())

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if self._saving:  # the save (snapshot or write, and any wait for an upload) held the steps
            self._checkpoint_s += time.time() - self._step_ended
            self._saving = False

    def on_save(self, args, state, control, **kwargs) -> None:
        self._saving = True

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self._step_ended = time.time()
        if self.first_step_time is None:
            self.first_step_time = time.time()
            if state.is_world_process_zero:
                self.sink.emit({"kind": "first_step", "time": self.first_step_time})

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now = time.time()
        tokens = float(logs.get("num_tokens", 0.0))
        tokens_per_second = per_device = None
        if self._last is not None and now > self._last[0]:
            tokens_per_second = (tokens - self._last[1]) / (now - self._last[0])
            per_device = tokens_per_second / self.world_size
        self._last = (now, tokens)
        waited, (last_step, last_wait) = self.data_wait(), self._waited
        self._waited = (state.global_step, waited)
        record = {
            "step": state.global_step,
            "loss": logs["loss"],
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens": int(tokens),
            "tokens_per_second": tokens_per_second,
            "tokens_per_second_per_device": per_device,
            "data_wait_s": round((waited - last_wait) / max(state.global_step - last_step, 1), 6),
            "checkpoint_s": round(self._checkpoint_s, 6),
            "time": now,
        }
        self._checkpoint_s = 0.0
        if self.flops_per_token and self.peak_flops:  # None in the first record, like the rates
            record["mfu"] = (
                self.flops_per_token * per_device / self.peak_flops if per_device is not None else None
            )
        epoch = self.epoch_of(state.global_step)
        if epoch is not None:
            record["epoch"] = round(epoch, 4)
        latest = self.eval_loss()
        if latest is not None and latest[0] == state.global_step:
            record["eval_loss"] = latest[1]
        if self.metrics is not None:
            self.metrics.append(record)
        self.sink.emit({"kind": "step", "max_steps": self.max_steps, **record})
