"""The submitter's own record of submissions, so ``status ID`` knows where ID runs.

Kept in ``$SFT_CLUSTER_STATE_DIR`` (default ``~/.local/state/sft-cluster``);
it holds ids, names, cluster file paths and output URIs, never credentials.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sft_cluster.launch.base import Submission


def state_dir() -> Path:
    """This submitter's own folder: ``$SFT_CLUSTER_STATE_DIR``, else ``~/.local/state/sft-cluster``."""
    return Path(os.environ.get("SFT_CLUSTER_STATE_DIR") or Path.home() / ".local" / "state" / "sft-cluster")


def _path() -> Path:
    return state_dir() / "submissions.jsonl"


def remember(submission: Submission) -> None:
    path = _path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(submission.to_dict(), sort_keys=True) + "\n")


def submissions() -> list[Submission]:
    path = _path()
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Submission(**row) for row in rows]


def find(job_id: str) -> Submission | None:
    """The newest submission with this id (a requeued Slurm job keeps its id)."""
    matches = [s for s in submissions() if s.id == job_id]
    return matches[-1] if matches else None
