"""The hang watchdog's decision: which rank has gone quiet for longer than its limit.

Every rank sends a heartbeat (``sft_cluster.train.heartbeat``) when a step begins (phase
``step``, with rank 0's time from the previous step's beginning when no evaluation or save came
between), around evaluations (``evaluating``), before a save (``saving``) and when training ends
(``done``: no longer watched). The limit of a ``step`` is the spec's ``step_timeout_s`` until
``warmup_steps`` steps were timed in this attempt, then ``median_multiple`` x the running median
step time within [``min_limit_s``, ``step_timeout_s``]; the other phases get ``step_timeout_s``.
When one rank hangs, the others stall in its next collective, so some rank's limit passes
whichever phase the hung one was in.

``Watchdog`` is pure: times are given (the clock of whoever receives the beats). What an
executor does with a hang (``py_spy_dump`` on the node of each rank, ``record_hang``, then end
the attempt) is the executor's.
"""

from __future__ import annotations

import re
import socket
import statistics
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft_cluster import storage
from sft_cluster.spec import WatchdogSpec
from sft_cluster.tracking import JsonlLog, RunDir

_WINDOW = 101  # step times the running median is taken over


@dataclass(frozen=True)
class Beat:
    """A rank's latest heartbeat: where it was, when it arrived, and which process sent it."""

    step: int
    phase: str
    at: float
    pid: int
    node: str


@dataclass(frozen=True)
class Hang:
    """Rank ``rank`` sent nothing for ``seconds`` (over ``limit_s``) at ``step``; ``beats``: every
    watched rank's latest beat, whose processes the driver dumps and ends; ``attempt``: the worker
    group's number in the run (``first_attempt``)."""

    rank: int
    step: int
    phase: str
    seconds: float
    limit_s: float
    attempt: int
    beats: dict[int, Beat] = field(default_factory=dict)

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> Hang:
        """The hang a ``hang`` event (``hang_event``) recorded, without the beats."""
        fields = ("rank", "step", "phase", "seconds", "limit_s", "attempt")
        return cls(*(event[name] for name in fields))

    def describe(self) -> str:
        return (
            f"rank {self.rank} hung at step {self.step} ({self.phase}): no heartbeat for "
            f"{self.seconds:.1f} s (limit {self.limit_s:.1f} s)"
        )


class Watchdog:
    """Fed the workers' events (``observe``), says when a rank hung (``check``)."""

    def __init__(self, spec: WatchdogSpec, first_attempt: int = 1):
        self.spec = spec
        self.attempt = first_attempt - 1  # counts the worker groups that start
        self._beats: dict[int, Beat] = {}
        self._started: set[int] = set()
        self._step_s: deque[float] = deque(maxlen=_WINDOW)

    def observe(self, event: dict[str, Any], at: float) -> bool:
        """Take a worker event received at ``at``; True when it was a heartbeat (for nobody else).

        A rank is watched from its ``start`` in this worker group: a ``start`` forgets every beat
        (those of an ended group must not look hung), a failed worker forgets everything (``reset``);
        the first ``start`` after that is a new attempt. Step times come from the lowest rank."""
        kind = event.get("kind")
        if kind == "beat":
            self._beat(event, at)
            return True
        if kind == "start":
            self.attempt += not self._started
            self._beats.clear()
            self._started.add(event["rank"])
        elif kind == "worker_failed":
            self.reset()
        return False

    def _beat(self, event: dict[str, Any], at: float) -> None:
        rank = event["rank"]
        if rank not in self._started:  # a straggler of an ended worker group
            return
        if event["phase"] == "done":
            self._beats.pop(rank, None)
            return
        if rank == min(self._started) and event.get("cycle_s") is not None:
            self._step_s.append(event["cycle_s"])
        self._beats[rank] = Beat(event["step"], event["phase"], at, event["pid"], event["node"])

    def reset(self) -> None:
        self._beats.clear()
        self._started.clear()
        self._step_s.clear()

    def limit_s(self, phase: str) -> float:
        """How long a rank may stay quiet in ``phase``."""
        spec = self.spec
        if phase != "step" or len(self._step_s) < spec.warmup_steps:
            return spec.step_timeout_s
        median = statistics.median(self._step_s)
        return min(spec.step_timeout_s, max(spec.min_limit_s, spec.median_multiple * median))

    def check(self, now: float) -> Hang | None:
        """The hang at ``now``, if any rank is past its limit; reported once (then all is forgotten
        until the next worker group starts). Named: the rank furthest behind (lowest step, oldest beat)."""
        late = [
            (beat.step, beat.at, rank)
            for rank, beat in self._beats.items()
            if now - beat.at > self.limit_s(beat.phase)
        ]
        if not late:
            return None
        _, _, rank = min(late)
        beat = self._beats[rank]
        hang = Hang(
            rank,
            beat.step,
            beat.phase,
            now - beat.at,
            self.limit_s(beat.phase),
            self.attempt,
            dict(self._beats),
        )
        self.reset()
        return hang


def first_attempt(run: RunDir) -> int:
    """The number of a new driver's first worker group: one more than the highest ``attempt-K``
    already in ``hangs/`` (a requeued or resumed run must not overwrite an earlier one's stacks)."""
    fs, path = storage.filesystem(run.hangs, run.options)
    names = [Path(name).name for name in fs.ls(path, detail=False)] if fs.exists(path) else []
    return 1 + max((int(n.split("-", 1)[1]) for n in names if re.fullmatch(r"attempt-\d+", n)), default=0)


def py_spy_dump(pid: int, timeout_s: float = 30.0) -> str:
    """``pid``'s state and Python stacks, read on its node. ``--nonblocking``: py-spy's default
    pauses the process first, which fails on a stopped one; without pausing it reads either."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        state = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("State:"))
    except (OSError, StopIteration):
        state = "unknown"
    py_spy = Path(sys.executable).with_name("py-spy")
    command = [str(py_spy) if py_spy.exists() else "py-spy", "dump", "--nonblocking", "--pid", str(pid)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        stacks = done.stdout + done.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        stacks = f"py-spy failed: {exc}\n"
    return f"pid {pid} on {socket.gethostname()}, state {state}\n\n{stacks}"


def write_stacks(run: RunDir, attempt: int, stacks: dict[int, str]) -> str:
    """Each rank's stacks into ``hangs/attempt-K/`` (an object per rank: nodes never share one);
    the folder's URI."""
    for rank, text in stacks.items():
        storage.write_text(run.hang_stacks(attempt, rank), text, run.options)
    return storage.join(run.hangs, f"attempt-{attempt}")


def hang_event(hang: Hang, stacks: str) -> dict[str, Any]:
    """The ``hang`` event of ``events.jsonl``; ``stacks``: the folder ``write_stacks`` wrote."""
    beat = hang.beats.get(hang.rank)
    return {
        "event": "hang",
        "rank": hang.rank,
        "node": beat.node if beat else None,
        "step": hang.step,
        "phase": hang.phase,
        "seconds": round(hang.seconds, 3),
        "limit_s": round(hang.limit_s, 3),
        "attempt": hang.attempt,
        "stacks": stacks,
        "time": time.time(),
    }


def append_events(run: RunDir, events: list[dict[str, Any]]) -> None:
    """Append to ``events.jsonl``, which an object store rewrites whole: only the run's one writer
    of it at that moment may call this (two at once would lose a line)."""
    log = JsonlLog(run.events, run.options)
    for event in events:
        log.append(event)
    log.close()


def record_hang(run: RunDir, hang: Hang, stacks: dict[int, str]) -> str:
    """Every rank's stacks and the ``hang`` event, written by the Ray driver (which alone watches
    every rank); the stacks' folder."""
    folder = write_stacks(run, hang.attempt, stacks)
    append_events(run, [hang_event(hang, folder)])
    return folder
