"""What every remote backend offers: submit (with dry run), status, logs, stop, list.

Modelled on torchx's scheduler API: a dry run is the submission request,
rendered and printed instead of sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from sft_cluster.exitcodes import PREEMPTED as PREEMPTED_EXIT_CODE  # noqa: F401 - re-exported
from sft_cluster.spec import JobSpec


class LaunchError(Exception):
    """A problem the user can act on (unreachable cluster, unknown job id, ...)."""


@dataclass
class Submission:
    """What ``submit``/``sbatch`` returns and the local registry remembers."""

    id: str
    backend: str
    cluster_file: str
    name: str
    output_uri: str
    submitted_at: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JobState:
    """One job as a backend sees it; ``state`` uses the backend's own words."""

    id: str
    state: str
    name: str | None = None
    start: float | None = None
    end: float | None = None
    output_uri: str | None = None
    message: str | None = None
    exit_code: int | None = None  # of the job's program, where the backend knows it

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def succeeded(self) -> bool:
        return self.state in ("SUCCEEDED", "COMPLETED")


TERMINAL_STATES = frozenset(
    {
        "SUCCEEDED",
        "FAILED",
        "STOPPED",
        "COMPLETED",
        "CANCELLED",
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
    }
)


class Backend(Protocol):
    kind: str

    def submit(self, job: JobSpec, dry_run: bool = False) -> Submission | str:
        """Submit ``job``; with ``dry_run`` return what would be submitted, as text."""

    def status(self, job_id: str) -> JobState: ...

    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]: ...

    def stop(self, job_id: str, now: bool = False, wait_seconds: float = 600) -> JobState:
        """Ask the job to checkpoint and end, and wait (up to ``wait_seconds``) until it has;
        ``now``: end it at once (work since the last commit is lost). Returns its final state."""

    def list(self) -> list[JobState]: ...
