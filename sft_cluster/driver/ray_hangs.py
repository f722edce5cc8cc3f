"""The Ray executor's end of the hang watchdog: asks the progress channel (which holds the
``Watchdog`` its heartbeats feed) for a hang, reads every rank's stacks on its own node, records
them and kills the ranks' processes: Ray Train sees its workers die, ends the attempt and starts
a new group, which resumes from the newest commit (within ``checkpoint.max_failures``)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sft_cluster.driver.watchdog import Hang, py_spy_dump, record_hang
from sft_cluster.tracking import RunDir

_DUMP_TIMEOUT_S = 30.0


@ray.remote(num_cpus=0)
def _dump(pids: dict[int, int]) -> dict[int, str]:
    """On the ranks' node (py-spy reads local processes only): rank -> its stacks."""
    return {rank: py_spy_dump(pid, _DUMP_TIMEOUT_S) for rank, pid in pids.items()}


@ray.remote(num_cpus=0)
def _kill(pids: list[int]) -> None:
    """SIGKILL: ends a stopped process too, and one stuck in a collective at once."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _on(node: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id=node, soft=False)


def end_attempt(hang: Hang, run: RunDir) -> str:
    """Dump every watched rank (all nodes before any kill: a kill wakes the others' collectives),
    record the stacks and the event, then kill the ranks (also when recording failed); where the
    stacks went, for the console."""
    by_node: dict[str, dict[int, int]] = {}
    for rank, beat in hang.beats.items():
        by_node.setdefault(beat.node, {})[rank] = beat.pid
    stacks: dict[int, str] = {}
    try:
        dumps = [_dump.options(scheduling_strategy=_on(n)).remote(p) for n, p in by_node.items()]
        for found in ray.get(dumps, timeout=_DUMP_TIMEOUT_S * len(hang.beats) + 60):
            stacks.update(found)
        where = f"every rank's stacks are in {record_hang(run, hang, stacks)}"
    except Exception as exc:  # the attempt must end all the same
        where = f"the stacks could not be recorded ({exc})"
    kills = [_kill.options(scheduling_strategy=_on(n)).remote(list(p.values())) for n, p in by_node.items()]
    ray.get(kills, timeout=60)
    return where


def watch_hangs(channel: Any, run: RunDir, stop: threading.Event, poll_s: float = 0.5) -> None:
    """Until ``stop``: end every attempt that hangs, and say so on the console (a notice)."""
    while not stop.wait(poll_s):
        hang: Hang | None = None
        with contextlib.suppress(ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            hang = ray.get(channel.hung.remote(), timeout=10)
        if hang is None:
            continue
        try:
            message = f"{hang.describe()}; {end_attempt(hang, run)}; ending the attempt"
        except Exception as exc:  # the watcher outlives a failed kill; the collective timeout remains
            message = f"{hang.describe()}; could not end it: {exc}"
        channel.push.remote({"kind": "notice", "message": message})
