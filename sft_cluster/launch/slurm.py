"""Slurm: submit the rendered sbatch script, follow it, stop it.

``plan`` renders the script and checks it with ``bash -n`` (a :class:`SlurmRequest`,
whose dry run is the script); ``launch`` writes it as ``<run>/slurm/job.sbatch`` with the
resolved ``job.yaml`` next to it (``<run>`` is the job's ``output_uri`` when it is a local
path, else a folder under the submitter's state directory) and submits it with
``sbatch --parsable --export=ALL``: secrets reach the job through the submitter's
environment, never through a file.

``stop`` leaves a stop request beside the script and sends the preemption
signal to the batch shell: the training commits a checkpoint and exits 75, and
the script, seeing the request, ends instead of requeueing itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_cluster import storage
from sft_cluster.launch import registry
from sft_cluster.launch.base import (
    JobState,
    LaunchError,
    Printed,
    Submission,
    anchor_local_paths,
    strategy_of,
    strategy_part,
)
from sft_cluster.launch.slurm_render import (
    STOP_PREFIX,
    check_syntax,
    node_count,
    render,
    sbatch_options,
    sbatch_quote,
    signal_name,
)
from sft_cluster.launch.slurm_status import (
    JOB_ID,
    check_id,
    job_state,
    listed,
    path_field,
    run,
    scontrol_show,
    tool,
)
from sft_cluster.spec import JobSpec, SlurmCluster, dump_job_yaml
from sft_cluster.tracking import run_dir_of

__all__ = [
    "SlurmBackend",
    "SlurmRequest",
    "check_syntax",
    "node_count",
    "render",
    "sbatch_options",
    "sbatch_quote",
    "signal_name",
]

# After a plain scancel: Slurm's KillWait (30 s by default) plus the epilog.
CANCEL_WAIT_S = 120
_POLL_S = 1.0


def _requeued(state: JobState) -> bool:
    return state.state == "PENDING" or state.state.startswith("REQUEUE")


@dataclass(frozen=True)
class SlurmRequest:
    """The batch job: the script, and the resolved job it reads, both to be written to ``folder``."""

    job: JobSpec
    strategy: dict[str, Any]
    script: str
    job_yaml: str
    folder: Path  # the launcher's folder: ``<output_uri>/slurm`` when the run directory is local

    @property
    def script_path(self) -> Path:
        return self.folder / "job.sbatch"

    def dry_run(self) -> list[Printed]:
        return [Printed(self.script, verbatim=True), strategy_part(self.strategy, stderr=True)]


class SlurmBackend:
    """``plan``/``launch``/``status``/``logs``/``stop``/``list`` for ``kind: slurm`` cluster files."""

    kind = "slurm"

    def __init__(self, cluster: SlurmCluster, cluster_file: str):
        self.cluster = cluster
        self.cluster_file = cluster_file

    # --- submit ------------------------------------------------------------------

    def folder(self, job: JobSpec) -> Path:
        """Where the script, the job YAML and the log go: ``<output_uri>/slurm`` when local."""
        if storage.is_local(job.output_uri):
            return storage.absolute_path(run_dir_of(job).slurm)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return registry.state_dir().absolute() / "slurm" / f"{job.name}-{stamp}"

    def _python(self) -> str:
        # With neither a set-up line nor a container, the submitter's interpreter (shared FS).
        return "python" if (self.cluster.setup or self.cluster.container) else sys.executable

    def plan(self, job: JobSpec) -> SlurmRequest:
        job = anchor_local_paths(job)
        folder = self.folder(job)
        script = render(job, self.cluster, run_dir=str(folder), workdir=os.getcwd(), python=self._python())
        check_syntax(script)
        return SlurmRequest(job, strategy_of(job), script, dump_job_yaml(job), folder)

    def launch(self, request: SlurmRequest) -> Submission:
        sbatch = tool("sbatch")
        request.folder.mkdir(parents=True, exist_ok=True)
        (request.folder / "job.yaml").write_text(request.job_yaml, encoding="utf-8")
        script_path = request.script_path
        script_path.write_text(request.script, encoding="utf-8")
        try:
            result = subprocess.run(
                [sbatch, "--parsable", "--export=ALL", str(script_path)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise LaunchError("sbatch did not answer in 60 s: is slurmctld up?") from None
        if result.returncode != 0:
            raise LaunchError(
                f"sbatch rejected {script_path}: {result.stderr.strip() or result.stdout.strip()}"
            )
        job_id = result.stdout.strip().split(";", 1)[0]
        if not JOB_ID.fullmatch(job_id):
            raise LaunchError(f"sbatch printed no job id: {result.stdout.strip()!r}")
        return Submission(
            id=job_id,
            backend=self.kind,
            cluster_file=self.cluster_file,
            name=request.job.name,
            output_uri=request.job.output_uri,
            submitted_at=time.time(),
            extra={"script": str(script_path), "log": str(request.folder / f"slurm-{job_id}.out")},
        )

    # --- status, logs ----------------------------------------------------------------

    def status(self, job_id: str) -> JobState:
        return job_state(job_id)

    def _job_file(self, job_id: str, extra_key: str, field: str) -> Path:
        """A file of the job: from this machine's registry, else from ``scontrol``'s ``field``."""
        known = registry.find(job_id)
        if known is not None and known.backend == self.kind and known.extra.get(extra_key):
            return Path(known.extra[extra_key])
        found = path_field(scontrol_show(job_id) or "", field)
        if found:
            return Path(found)
        raise LaunchError(
            f"no {field} known for Slurm job '{job_id}' (not in scontrol, not submitted from here)"
        )

    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        check_id(job_id)
        path = self._job_file(job_id, "log", "StdOut")
        return self._read_log(job_id, path, follow)

    def _read_log(self, job_id: str, path: Path, follow: bool) -> Iterator[str]:
        while follow and not path.exists():
            if self.status(job_id).finished:
                break
            time.sleep(1)
        if not path.exists():
            if follow:
                return
            raise LaunchError(f"no log yet for Slurm job '{job_id}': {path} does not exist (still pending?)")
        with path.open(encoding="utf-8", errors="replace") as handle:
            while True:
                line = handle.readline()
                if line:
                    yield line
                    continue
                if not follow or self.status(job_id).finished:
                    yield from handle.readlines()
                    return
                time.sleep(1)

    # --- stop ------------------------------------------------------------------------

    def stop(self, job_id: str, now: bool = False, wait_seconds: float = 600) -> JobState:
        """A running job checkpoints and ends without a requeue; ``now``, or a job that is not
        running (nothing new to save): ``scancel``."""
        state = self.status(job_id)  # unknown ids fail loudly
        if state.finished:
            raise LaunchError(f"Slurm job '{job_id}' is already {state.state}: nothing to stop")
        if now or state.state != "RUNNING":
            self._scancel(job_id)
            return self._wait(job_id, CANCEL_WAIT_S, lambda s: s.finished)
        request = self._request_stop(job_id)
        sig = signal_name(self.cluster.signal)
        sent = run(["scancel", f"--signal={sig}", "--batch", job_id], "scancel")
        if sent.returncode != 0:
            request.unlink(missing_ok=True)
            raise LaunchError(f"scancel --signal={sig} --batch {job_id} failed: {sent.stderr.strip()}")
        final = self._wait(job_id, wait_seconds, lambda s: s.finished or _requeued(s))
        if final.finished:
            outcome = self._outcome(request.parent)
            final.message = f"stopped by sft-cluster stop: {outcome}" if outcome else final.message
            return final
        if _requeued(final):
            why = (
                f"it requeued itself although asked to stop (its script did not see {request}: "
                "submitted by an older sft-cluster, or that folder is not shared with the node)"
            )
        else:
            why = f"it was still {final.state} {wait_seconds:g} s after the stop request"
        self._scancel(job_id)
        final = self._wait(job_id, CANCEL_WAIT_S, lambda s: s.finished)
        outcome = self._outcome(request.parent) or "steps since its last committed checkpoint are lost"
        final.message = f"{why}: cancelled with scancel; {outcome}"
        return final

    def _scancel(self, job_id: str) -> None:
        result = run(["scancel", job_id], "scancel")
        if result.returncode != 0:
            raise LaunchError(f"scancel {job_id} failed: {result.stderr.strip()}")

    def _wait(self, job_id: str, seconds: float, done: Callable[[JobState], bool]) -> JobState:
        deadline = time.monotonic() + seconds
        while True:
            state = self.status(job_id)
            if done(state) or time.monotonic() >= deadline:
                return state
            time.sleep(_POLL_S)

    def _request_stop(self, job_id: str) -> Path:
        """``<run>/slurm/stop-<SLURM_JOB_ID>``, which the batch script checks on exit 75."""
        line = scontrol_show(job_id) or ""
        numeric = re.search(r"\bJobId=(\d+)", line)  # an array task's own id, as the script sees it
        run_dir = self._job_file(job_id, "script", "Command").parent
        request = run_dir / f"{STOP_PREFIX}{numeric.group(1) if numeric else job_id}"
        try:
            request.write_text(f"sft-cluster stop at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        except OSError as exc:
            raise LaunchError(
                f"cannot write the stop request {request} ({exc.strerror or exc}): the job is still "
                f"running; end it with 'sft-cluster stop {job_id} --now' (steps since its last "
                "checkpoint are lost)"
            ) from None
        return request

    def _outcome(self, run_dir: Path) -> str | None:
        """What the run left, from its ``summary.json``; None when that cannot be read from here."""
        from sft_cluster.spec import SpecError, load_job

        try:
            run_uri = run_dir_of(load_job(run_dir / "job.yaml"))
            summary = run_uri.read_json(run_uri.summary)
            steps, status = int(summary["steps"]), summary["status"]
            committed = run_uri.checkpoint_store().is_committed(steps)
        except (OSError, ValueError, KeyError, TypeError, SpecError):
            return None
        saved = "checkpoint committed" if committed else "no committed checkpoint of that step"
        outcome = f"step {steps}, {saved} (summary.json: status {status})"
        if status == "completed":
            return outcome
        return f"{outcome}; resume with: sft-cluster resume {run_uri.uri} --cluster {self.cluster_file}"

    # --- list --------------------------------------------------------------------------

    def list(self) -> list[JobState]:
        mine = [s for s in registry.submissions() if s.backend == self.kind]
        states = listed()
        for submission in mine:
            if submission.id not in states:
                try:
                    states[submission.id] = self.status(submission.id)
                except LaunchError:
                    continue
            states[submission.id].output_uri = submission.output_uri
        return [states[key] for key in sorted(states, key=lambda k: int(k.split("_")[0]))]
