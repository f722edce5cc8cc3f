"""Heartbeats for the driver's hang watchdog (``sft_cluster.driver.watchdog``).

Each rank sends a beat when a step begins (phase ``step``, with the time since the previous step
began when nothing long came between), when an evaluation starts and ends (``evaluating``, then
``step`` again), when a checkpoint is about to be saved (``saving``) and when training ends
(``done``; the final commit is waited for in ``saving``, the export after is not watched).
Evaluations and saves are judged by the spec's fixed timeout, never by the median step time. A
beat is one sink event that never waits on the driver: a fire-and-forget actor call under Ray, a
line appended to a node-local file under torchrun (``BeatFiles``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from sft_cluster.train.evaluation import EvalCallback
from sft_cluster.train.progress import ProgressSink
from sft_cluster.train.staging import node_key

# Set by the torchrun executor: the node-local folder its watcher reads each rank's beats from.
BEATS_ENV = "SFT_CLUSTER_HEARTBEAT_DIR"


class Heartbeat(TrainerCallback):
    """Sends this rank's beats. Last among the job's callbacks: a save another callback asks for at
    the end of a step is known by then. The ``evaluator``'s events reach it too."""

    def __init__(self, sink: ProgressSink, rank: int, evaluator: EvalCallback | None = None):
        allow_stack_dumps()
        self.sink = sink
        if evaluator is not None:
            evaluator.listen(self._evaluation)
        self.origin = {"rank": rank, "pid": os.getpid(), "node": node_key()}
        self._begun: float | None = None  # when the current step began
        self._plain = False  # nothing but training since then

    def _beat(self, step: int, phase: str, **extra: Any) -> None:
        self.sink.emit({"kind": "beat", "step": step, "phase": phase, **self.origin, **extra})

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        now = time.monotonic()
        cycle = round(now - self._begun, 6) if self._plain and self._begun is not None else None
        self._beat(state.global_step + 1, "step", cycle_s=cycle)
        self._begun, self._plain = now, True

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if control.should_save:
            self._plain = False
            self._beat(state.global_step, "saving")

    def _evaluation(self, event: dict[str, Any]) -> None:
        """An ``eval_started`` or ``eval_finished`` event of the ``EvalCallback``."""
        self._plain = False
        self._beat(event["step"], "evaluating" if event["event"] == "eval_started" else "step")

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self._beat(state.global_step, "done")


def allow_stack_dumps() -> bool:
    """Let any process of this user read this one's stacks: the watchdog's py-spy runs beside the
    worker, not as its parent, which Yama's ``ptrace_scope`` 1 (Ubuntu's default) allows only to a
    tracer the process names (``PR_SET_PTRACER``, ``PR_SET_PTRACER_ANY``). Without Yama the call
    fails and nothing is needed; under scope 2 or 3 it changes nothing (``sft-cluster doctor``
    says so). True when the kernel took it."""
    import ctypes

    pr_set_ptracer, any_process = 0x59616D61, ctypes.c_ulong(-1)
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(pr_set_ptracer, any_process, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


class BeatFiles:
    """The sink of a worker whose driver watches node-local files (the torchrun executor's
    ``NodeWatch``): ``start`` and ``beat`` events are appended, a line each, to this rank's file
    in ``BEATS_ENV``'s folder; everything but beats goes on to ``inner``."""

    def __init__(self, folder: Path, rank: int, inner: ProgressSink):
        self.inner = inner
        self._file = (folder / f"rank-{rank}.jsonl").open("a", buffering=1)  # a write per line

    def emit(self, event: dict[str, Any]) -> None:
        if event.get("kind") in ("start", "beat"):
            self._file.write(json.dumps(event) + "\n")
        if event.get("kind") != "beat":
            self.inner.emit(event)


def node_sink(inner: ProgressSink) -> ProgressSink:
    """``inner``, or ``BeatFiles`` around it where the launcher watches this node's heartbeats."""
    folder = os.environ.get(BEATS_ENV)
    return BeatFiles(Path(folder), int(os.environ.get("RANK", 0)), inner) if folder else inner
