"""What every backend offers: ``plan`` a job into a request, ``launch`` it, then follow the job.

Modelled on torchx's scheduler API, where ``submit`` is ``schedule(submit_dryrun(...))``: a
backend's ``plan`` builds the whole request (the sbatch script, the Ray Job's entrypoint and
runtime env, the local plan) without touching anything, so a dry run is that request printed
and a launch is that request sent. No backend knows whether it is in a dry run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sft_cluster import storage
from sft_cluster.spec import JobSpec


class LaunchError(Exception):
    """A problem the user can act on (unreachable cluster, unknown job id, ...)."""


@dataclass
class Submission:
    """What ``launch`` returns and the local registry remembers."""

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


@dataclass(frozen=True)
class Printed:
    """One part of a dry run: its text and where it goes.

    ``verbatim``: a script or request shown as it would be sent (no markup, no wrapping);
    ``stderr``: commentary kept off stdout, so the script on stdout can be piped as it is.
    """

    text: str
    stderr: bool = False
    verbatim: bool = False


class Request(Protocol):
    """What a backend would send for a job; printing it is the dry run."""

    @property
    def job(self) -> JobSpec:
        """The resolved job, local paths absolute."""

    def dry_run(self) -> list[Printed]:
        """The request as ``--dry-run`` shows it, secrets left out."""


RequestT = TypeVar("RequestT", bound=Request)


class Backend(Protocol[RequestT]):
    kind: str

    def plan(self, job: JobSpec) -> RequestT:
        """Everything that would be sent for ``job``; sends, writes and starts nothing."""

    def launch(self, request: RequestT) -> Submission:
        """Send ``request`` (from ``plan``): submit the job, or run it here."""

    def status(self, job_id: str) -> JobState: ...

    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]: ...

    def stop(self, job_id: str, now: bool = False, wait_seconds: float = 600) -> JobState:
        """Ask the job to checkpoint and end, and wait (up to ``wait_seconds``) until it has;
        ``now``: end it at once (work since the last commit is lost). Returns its final state."""

    def list(self) -> list[JobState]: ...


def strategy_of(job: JobSpec) -> dict[str, Any]:
    """The accelerate/DeepSpeed settings the run will generate, as it will record them."""
    from sft_cluster.train.strategy import describe_strategy

    return describe_strategy(job)


def strategy_part(strategy: dict[str, Any], stderr: bool) -> Printed:
    """The dry run's ``strategy.json`` section."""
    text = "# strategy.json (generated from the job's strategy section)\n"
    return Printed(text + json.dumps(strategy, indent=2, sort_keys=True), stderr=stderr)


def anchor_local_paths(job: JobSpec) -> JobSpec:
    """Make relative local paths absolute, so workers resolve them like the user did."""

    def anchor(uri: str) -> str:
        if uri.startswith("builtin:") or not storage.is_local(uri):
            return uri
        return str(storage.absolute_path(uri))

    sources = [s.model_copy(update={"uri": anchor(s.uri)}) for s in job.data.sources]
    eval_sources = [s.model_copy(update={"uri": anchor(s.uri)}) for s in job.data.eval]
    model = job.model
    if Path(model.name_or_path).exists():
        model = model.model_copy(update={"name_or_path": anchor(model.name_or_path)})
    return job.model_copy(
        update={
            "output_uri": anchor(job.output_uri),
            "data": job.data.model_copy(update={"sources": sources, "eval": eval_sources}),
            "model": model,
        }
    )
