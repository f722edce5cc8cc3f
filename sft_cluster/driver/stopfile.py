"""``sft-cluster stop`` of a Ray run: ``control/stop`` in the run directory, naming the run."""

from __future__ import annotations

import contextlib
import json
import time

from sft_cluster import storage
from sft_cluster.tracking import RunDir


class StopFile:
    """The request the driver polls; one that names another run (left from an earlier stop of
    this directory) is removed at start and never acted on."""

    POLL_SECONDS = 2.0

    def __init__(self, run: RunDir, run_id: str):
        self.run = run
        self.run_id = run_id
        self._next_poll = 0.0

    def _named_run(self) -> str | None:
        try:
            return json.loads(storage.read_text(self.run.stop_request, self.run.options)).get("run_id")
        except (FileNotFoundError, ValueError, AttributeError):
            return None

    def clear(self, only_stale: bool = False) -> None:
        if storage.exists(self.run.stop_request, self.run.options) and not (
            only_stale and self._named_run() == self.run_id
        ):
            fs, path = storage.filesystem(self.run.stop_request, self.run.options)
            fs.rm(path)

    def requested(self) -> bool:
        """Whether this run was asked to stop (reads storage at most every POLL_SECONDS)."""
        if time.monotonic() < self._next_poll:
            return False
        self._next_poll = time.monotonic() + self.POLL_SECONDS
        with contextlib.suppress(OSError):
            return self._named_run() == self.run_id
        return False
