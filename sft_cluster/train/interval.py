"""``checkpoint.every_n_steps: auto``: the checkpoint interval that loses the least time, from the
step time and checkpoint stall measured in this attempt and the job's mean time between failures.

Checkpointing every tau seconds costs a stall delta each time; a failure, on average every M
seconds, loses the work since the last checkpoint. Daly's optimum (J. T. Daly, "A higher order
estimate of the optimum checkpoint interval for restart dumps", FGCS 2006), which refines Young's
sqrt(2 delta M), is the interval chosen. docs/goodput.md has the model.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

from transformers import TrainerCallback

from sft_cluster.train import collectives


def expected_goodput(interval_s: float, stall_s: float, mttf_s: float, restart_s: float) -> float:
    """The fraction of wall time spent on steps that are kept (first order in 1/M): of each cycle of
    interval + stall the interval trains, and each failure costs the restart and, on average, half
    a cycle of work trained again."""
    cycle = interval_s + stall_s
    return interval_s / cycle * (1 - (restart_s + cycle / 2) / mttf_s)


def daly_interval_s(stall_s: float, mttf_s: float) -> float:
    """Seconds of training between checkpoints that maximise expected goodput."""
    if stall_s <= 0:
        return 0.0
    if stall_s >= 2 * mttf_s:  # failures outpace checkpoints: checkpoint once per failure
        return mttf_s
    ratio = stall_s / (2 * mttf_s)
    return math.sqrt(2 * stall_s * mttf_s) * (1 + math.sqrt(ratio) / 3 + ratio / 9) - stall_s


class AutoInterval(TrainerCallback):
    """Saves once at the end of warm-up to measure the stall, then every chosen number of steps.

    Every rank measures; the slowest rank's step and stall decide (one all-reduce), so every rank
    saves at the same steps. ``notify`` tells the user what was chosen and why.
    """

    def __init__(self, mttf_hours: float, warm_up_steps: int, notify: Callable[[str], None]):
        self.mttf_s = mttf_hours * 3600
        self.warm_up_steps = max(3, warm_up_steps)
        self.notify = notify
        self.every: int | None = None  # chosen after the measuring save
        self._first_step: int | None = None
        self._measure_at: int | None = None
        self._step_began = 0.0
        self._step_ended = 0.0
        self._durations: list[float] = []
        self._stall_s: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        now = time.monotonic()
        if self._measure_at is not None and state.global_step == self._measure_at:
            self._stall_s = now - self._step_ended  # the save of the step before this one
            self._choose(state.global_step)
        self._step_began = now

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        step = state.global_step
        if self._first_step is None:
            self._first_step = step
        elif self._measure_at is None:  # the first step of an attempt (start-up) is left out
            self._durations.append(now - self._step_began)
        self._step_ended = now
        if self._measure_at is None and step - self._first_step + 1 >= self.warm_up_steps:
            self._measure_at = step  # set before the save: on_step_begin of the next step measures it
            control.should_save = True
        elif self.every is not None and (step - self._measure_at) % self.every == 0:
            control.should_save = True
        return control

    def _choose(self, step: int) -> None:
        step_s, stall_s = collectives.reduce_numbers(
            [statistics.median(self._durations), max(self._stall_s, 0.0)], "max"
        )
        interval_s = daly_interval_s(stall_s, self.mttf_s)
        self.every = max(1, round(interval_s / step_s)) if step_s > 0 else 1
        self.notify(
            f"checkpoint.every_n_steps = auto: every {self.every} steps ({_duration(self.every * step_s)}) "
            f"from step {self._measure_at}; measured step {step_s:.3f} s, checkpoint stall "
            f"{stall_s:.2f} s, checkpoint.mttf_hours {self.mttf_s / 3600:g} (Daly's optimum "
            f"{_duration(interval_s)})"
        )


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
