"""The torchrun executor's end of the hang watchdog: one watcher per node, beside torchrun's agent.

The workers of this node append their heartbeats to files in a node-local folder
(``sft_cluster.train.heartbeat.BeatFiles``); a thread reads them into a ``Watchdog`` and, on a
hang, writes this node's ranks' stacks and its record of the hang, then kills those ranks. When
one rank hangs, every rank stalls in its next collective, so every node's watcher fires on its own,
at about the same moment: each writes objects of its own (``hangs/attempt-K/node-N.json``), and the
first node's driver alone appends them to ``events.jsonl`` (``collect_node_hangs``), once its agent
ended, and again before its next agent starts (a record written after that first collection).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from sft_cluster import storage
from sft_cluster.driver.watchdog import (
    Hang,
    Watchdog,
    append_events,
    first_attempt,
    hang_event,
    py_spy_dump,
    write_stacks,
)
from sft_cluster.spec import WatchdogSpec
from sft_cluster.storage.retry import retrying
from sft_cluster.tracking import RunDir, read_jsonl
from sft_cluster.train.heartbeat import BEATS_ENV


class NodeWatch:
    """While open: ``BEATS_ENV`` names the folder for the workers it starts; ``hang`` is the hang it
    ended, if any; ``attempt``: the number of the one worker group its agent starts."""

    def __init__(self, spec: WatchdogSpec, run: RunDir, node_rank: int = 0, poll_s: float = 0.25):
        self.attempt = first_attempt(run)
        self.watchdog = Watchdog(spec, self.attempt)
        self.run = run
        self.node_rank = node_rank
        self.poll_s = poll_s
        self.hang: Hang | None = None
        self._folder = Path(tempfile.mkdtemp(prefix="sftc-beats-"))
        self._read: dict[Path, int] = {}  # bytes of each file read so far
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> NodeWatch:
        os.environ[BEATS_ENV] = str(self._folder)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        os.environ.pop(BEATS_ENV, None)
        shutil.rmtree(self._folder, ignore_errors=True)

    def _take_new_lines(self) -> None:
        for path in sorted(self._folder.glob("rank-*.jsonl")):
            with path.open("rb") as handle:
                handle.seek(self._read.get(path, 0))
                chunk = handle.read()
            whole = chunk[: chunk.rfind(b"\n") + 1]  # a line being written is read next time
            self._read[path] = self._read.get(path, 0) + len(whole)
            now = time.monotonic()
            for line in whole.splitlines():
                self.watchdog.observe(json.loads(line), now)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._take_new_lines()
            hang = self.watchdog.check(time.monotonic())
            if hang is not None and self.hang is None:
                self.hang = hang
                self._end(hang)

    def _end(self, hang: Hang) -> None:
        """Stacks first (a kill wakes the others' collectives), then the kills, also when recording
        the stacks failed."""
        pids = {rank: beat.pid for rank, beat in hang.beats.items()}
        stacks = {rank: py_spy_dump(pid) for rank, pid in pids.items()}
        try:
            where = f"this node's ranks' stacks are in {self._record(hang, stacks)}"
        except Exception as exc:  # the attempt must end all the same
            where = f"the stacks could not be recorded ({exc})"
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        print(f"sft-cluster: {hang.describe()}; {where}; ending the attempt", file=sys.stderr, flush=True)

    def _record(self, hang: Hang, stacks: dict[int, str]) -> str:
        folder = write_stacks(self.run, hang.attempt, stacks)
        record = {**hang_event(hang, folder), "node_rank": self.node_rank}
        self.run.write_json(self.run.node_hang(hang.attempt, self.node_rank), record)
        return folder


def collect_node_hangs(run: RunDir) -> list[dict]:
    """Append to ``events.jsonl`` every node's record of a hang not there yet, in time order; the
    records appended. Only the first node's driver calls it, while no worker of the run is running."""
    fs, path = storage.filesystem(run.hangs, run.options)
    found = retrying(fs.glob, f"{path}/attempt-*/node-*.json", what=f"listing {run.hangs}")
    records = [run.read_json(fs.unstrip_protocol(record)) for record in found]
    events = read_jsonl(run.events, run.options)
    logged = {(e["attempt"], e.get("node_rank")) for e in events if e.get("event") == "hang"}
    new = [r for r in records if (r["attempt"], r["node_rank"]) not in logged]
    new.sort(key=lambda record: record["time"])
    if new:
        append_events(run, new)
    return new
