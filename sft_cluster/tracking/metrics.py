"""JSON-lines logs of a run (``metrics.jsonl``, ``events.jsonl``), on any storage."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sft_cluster import storage


class JsonlLog:
    """Appends one JSON line per logged step.

    A local run directory is appended in place. For an object store (which
    cannot append) the lines go to a local file that is uploaded whole at most
    every ``sync_seconds`` and on ``close``. Existing lines are kept, so a
    resumed run continues the same file. ``on_append`` gets every record appended (the trackers).
    """

    def __init__(
        self,
        uri: str,
        options: dict[str, Any] | None = None,
        sync_seconds: float = 10.0,
        on_append: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.uri = uri
        self.on_append = on_append
        self.options = options or {}
        self.sync_seconds = sync_seconds
        self._last_sync = 0.0
        if storage.is_local(uri):
            self._path = storage.local_path(uri)
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._remote = False
        else:
            self._path = Path(tempfile.mkdtemp(prefix="sftc-log-")) / Path(uri).name
            if storage.exists(uri, self.options):
                self._path.write_text(storage.read_text(uri, self.options))
            self._remote = True

    def truncate_after(self, step: int) -> list[dict[str, Any]]:
        """Drop records past ``step`` (a resumed run redoes those steps and logs them again); the
        records dropped, the work the restart lost."""
        records = read_jsonl_file(self._path)
        kept = [r for r in records if r.get("step", 0) <= step]
        self._path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        self.sync()
        return [r for r in records if r.get("step", 0) > step]

    def append(self, record: dict[str, Any]) -> None:
        with self._path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self.on_append is not None:
            self.on_append(record)
        if self._remote and time.monotonic() - self._last_sync > self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        if self._remote:
            storage.write_text(self.uri, self._path.read_text(), self.options)
            self._last_sync = time.monotonic()

    def close(self) -> None:
        self.sync()


def _parse(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_jsonl_file(path: Path) -> list[dict[str, Any]]:
    return _parse(path.read_text()) if path.exists() else []


def read_jsonl(uri: str, options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """All records of a JSON-lines file; empty when it does not exist yet."""
    if not storage.exists(uri, options):
        return []
    return _parse(storage.read_text(uri, options))
