"""Ray Jobs: submit the driver to an existing Ray cluster through its dashboard.

The submission is one HTTP request, planned by :meth:`RayJobsBackend.plan` as a
:class:`RayJobsRequest` (whose ``dry_run`` is ``submit --dry-run``):

- ``entrypoint``: ``python -m sft_cluster.driver --job-env SFT_CLUSTER_JOB_YAML``,
  run by the cluster's ``python`` in the uploaded ``working_dir``;
- ``runtime_env``: the working_dir (this project, minus the cluster file's
  ``excludes`` and ``.gitignore``), ``py_modules``, an optional ``image_uri``,
  and ``env_vars``: the cluster file's, the submitter's ``pass_env`` variables
  (copied at submit time) and the resolved job YAML itself. Keeping the job in
  an environment variable leaves the package unchanged between submissions,
  so Ray uploads the project once and reuses it.
- ``metadata``: ``job_name``, ``output_uri``, the cluster file's metadata.

The submission id doubles as the run id (``SFT_CLUSTER_RUN_ID``): ``stop``
writes a request naming it into the run directory (see ``ray_rundir``), and
a job that checkpointed on request (driver exit 75) is shown as PREEMPTED.

The auth token travels only in the ``Authorization`` header of each request;
it is never written into the runtime_env, the job or anything printed.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sft_cluster import exitcodes, storage
from sft_cluster.launch import ray_client, ray_rundir
from sft_cluster.launch.base import (
    JobState,
    LaunchError,
    Printed,
    Submission,
    anchor_local_paths,
    strategy_of,
    strategy_part,
)
from sft_cluster.launch.ray_client import ADDRESS_VARS, TOKEN_VARS
from sft_cluster.launch.ray_rundir import JOB_ENV
from sft_cluster.spec import JobSpec, RayCluster, dump_job_yaml
from sft_cluster.spec.cluster import CREDENTIAL_VAR, redact_text
from sft_cluster.tracking import RUN_ID_ENV

ENTRYPOINT = f"python -m sft_cluster.driver --job-env {JOB_ENV}"
LOG_TAIL_LINES = 15
_POLL_S = 1.0


@dataclass(frozen=True)
class RayJobsRequest:
    """One Ray Job submission: what ``JobSubmissionClient.submit_job`` receives (:meth:`kwargs`),
    and what its dry run says about where it would go."""

    job: JobSpec  # local paths absolute: relative ones would land in Ray's scratch working_dir
    strategy: dict[str, Any]
    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    entrypoint_num_cpus: float
    entrypoint_resources: dict[str, float]
    address: str  # as the dry run shows it: the address and where it came from
    auth: str
    warnings: tuple[str, ...] = ()
    passed: frozenset[str] = frozenset()  # copied from the submitting shell: redacted when shown

    def kwargs(self) -> dict[str, Any]:
        """The arguments of ``submit_job``."""
        request: dict[str, Any] = {
            "submission_id": self.submission_id,
            "entrypoint": self.entrypoint,
            "runtime_env": self.runtime_env,
            "metadata": self.metadata,
            "entrypoint_num_cpus": self.entrypoint_num_cpus,
        }
        if self.entrypoint_resources:
            request["entrypoint_resources"] = dict(self.entrypoint_resources)
        return request

    def render(self) -> str:
        """The request as text, secrets redacted."""
        shown = json.loads(json.dumps(self.kwargs()))
        env_vars = shown["runtime_env"]["env_vars"]
        job_yaml = env_vars[JOB_ENV]
        env_vars[JOB_ENV] = f"<the resolved job below, {len(job_yaml)} bytes>"
        for name in env_vars:
            if name in self.passed:
                env_vars[name] = f"<redacted: ${name} of the submitting shell>"
            elif CREDENTIAL_VAR.search(name):
                env_vars[name] = "<redacted>"
        lines = [
            "# dry run: nothing was submitted",
            f"# address: {redact_text(self.address)}",
            f"# auth: {self.auth}",
        ]
        lines += [f"# warning: {w}" for w in self.warnings]
        lines += [
            "",
            f"entrypoint: {shown['entrypoint']}",
            "request:",
            json.dumps({k: v for k, v in shown.items() if k != "entrypoint"}, indent=2),
            "",
            f"# resolved job (runtime_env.env_vars.{JOB_ENV}):",
            job_yaml.rstrip(),
        ]
        return redact_text("\n".join(lines))

    def dry_run(self) -> list[Printed]:
        return [Printed(self.render(), verbatim=True), strategy_part(self.strategy, stderr=True)]


class RayJobsBackend:
    """``plan``/``launch``/``status``/``logs``/``stop``/``list`` for ``kind: ray`` cluster files."""

    kind = "ray"

    def __init__(self, cluster: RayCluster, cluster_file: str):
        self.cluster = cluster
        self.cluster_file = cluster_file
        self._client_cache: Any = None

    # --- where and who -----------------------------------------------------------

    def address(self) -> tuple[str, str]:
        """(address, where it came from): the cluster file, else the environment."""
        return ray_client.address_of(self.cluster, self.cluster_file)

    def token(self) -> str | None:
        """The auth token (``auth.mode: token``), from ``$auth.token_env`` or ``auth.token_file``."""
        return ray_client.token_of(self.cluster, self.cluster_file)

    # --- the request -------------------------------------------------------------

    def passed_env(self) -> dict[str, str]:
        """The submitter's variables named (or globbed) by ``runtime_env.pass_env``."""
        patterns = self.cluster.runtime_env.pass_env
        never = {*TOKEN_VARS, self.cluster.auth.token_env, *ADDRESS_VARS, JOB_ENV, RUN_ID_ENV}
        return {
            name: value
            for name, value in sorted(os.environ.items())
            if name not in never and any(fnmatch.fnmatchcase(name, p) for p in patterns)
        }

    def pass_env_warnings(self) -> tuple[str, ...]:
        """Exact ``pass_env`` names (not globs) absent from the submitter's environment."""
        missing = [
            name
            for name in self.cluster.runtime_env.pass_env
            if not any(c in name for c in "*?[") and name not in os.environ
        ]
        return (f"runtime_env.pass_env: not set here, not passed: {', '.join(missing)}",) if missing else ()

    def runtime_env(self, job_yaml: str, run_id: str, passed: dict[str, str]) -> dict[str, Any]:
        """The working_dir, modules and image, and the variables: the file's, ``passed``, the job."""
        spec = self.cluster.runtime_env
        env: dict[str, Any] = {}
        if spec.working_dir:
            env["working_dir"] = _runtime_path(spec.working_dir)
            env["excludes"] = list(spec.excludes)
        if spec.py_modules:
            env["py_modules"] = [_runtime_path(m) for m in spec.py_modules]
        if spec.image_uri:
            env["image_uri"] = spec.image_uri
        env["env_vars"] = {
            **spec.env_vars,
            **passed,
            # The driver's ray.init adds worker settings: let them win over ours.
            "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
            # The driver honours only a stop request (control/stop) naming this run.
            RUN_ID_ENV: run_id,
            JOB_ENV: job_yaml,
        }
        return env

    def plan(self, job: JobSpec) -> RayJobsRequest:
        job = anchor_local_paths(job)
        submission_id = _new_id(job.name)
        passed = self.passed_env()
        try:
            address, source = self.address()
            where = f"{address} (from {source})"
        except LaunchError:
            where = "<not set: RAY_API_SERVER_ADDRESS at submit time>"
        return RayJobsRequest(
            job=job,
            strategy=strategy_of(job),
            submission_id=submission_id,
            entrypoint=ENTRYPOINT,
            runtime_env=self.runtime_env(dump_job_yaml(job), submission_id, passed),
            metadata={
                **self.cluster.metadata,
                "job_name": job.name,
                "output_uri": job.output_uri,
                "launcher": "sft-cluster",
            },
            entrypoint_num_cpus=self.cluster.entrypoint_num_cpus,
            entrypoint_resources=dict(self.cluster.entrypoint_resources),
            address=where,
            auth=ray_client.auth_words(self.cluster.auth),
            warnings=self.pass_env_warnings(),
            passed=frozenset(passed),
        )

    # --- talking to the cluster ----------------------------------------------------

    def _client(self) -> Any:
        if self._client_cache is not None:
            return self._client_cache
        address, _ = self.address()
        token = self.token()
        headers = {"Authorization": f"Bearer {token}"} if token else None
        timeout = ray_client.request_timeout()
        with self._errors():
            self._client_cache = ray_client.connect(address, headers, timeout)
        return self._client_cache

    @contextlib.contextmanager
    def _errors(self, job_id: str | None = None) -> Iterator[None]:
        """Every failure of a request as a one-line LaunchError the user can act on."""
        try:
            address, source = self.address()
        except LaunchError:
            address, source = "?", "?"
        where = f"the Ray cluster at {redact_text(address)}"
        try:
            yield
        except LaunchError:
            raise
        except Exception as exc:
            raise LaunchError(
                ray_client.explain(exc, where, source, job_id, self.cluster.auth, self.cluster_file)
            ) from None

    # --- the Backend protocol ----------------------------------------------------

    def launch(self, request: RayJobsRequest) -> Submission:
        for warning in request.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        client = self._client()
        address, _ = self.address()
        with self._errors():
            submission_id = client.submit_job(**request.kwargs())
        return Submission(
            id=submission_id,
            backend=self.kind,
            cluster_file=self.cluster_file,
            name=request.job.name,
            output_uri=request.metadata["output_uri"],
            submitted_at=time.time(),
            extra={"address": redact_text(address)},
        )

    def _info(self, job_id: str) -> Any:
        client = self._client()
        with self._errors(job_id):
            return client.get_job_info(job_id)

    def status(self, job_id: str) -> JobState:
        return self._described(job_id, self._info(job_id))

    def _described(self, job_id: str, info: Any) -> JobState:
        """The state, with what a failed job printed last or where a preempted one can resume."""
        state = _state(info)
        if state.state == "FAILED":
            state.message = self._failure(job_id, info)
        elif state.state == "PREEMPTED":
            state.message = ray_rundir.preempted_message(info, self.cluster_file)
        return state

    def _failure(self, job_id: str, info: Any) -> str:
        code = getattr(info, "driver_exit_code", None)
        head = f"exit code {code}" if code is not None else (info.message or "failed").splitlines()[0]
        try:
            with self._errors(job_id):
                text = self._client().get_job_logs(job_id)
        except LaunchError:
            text = ""
        lines = [line for line in text.splitlines() if line.strip()][-LOG_TAIL_LINES:]
        if not lines:
            return head
        return head + "; last lines of the log:\n" + "\n".join(f"  {line}" for line in lines)

    def logs(self, job_id: str, follow: bool = False) -> Iterator[str]:
        client = self._client()
        self._info(job_id)  # a clear error for an unknown id, before any streaming
        if not follow:
            with self._errors(job_id):
                text = client.get_job_logs(job_id)
            return iter([text])
        return self._tail(client, job_id)

    def _tail(self, client: Any, job_id: str) -> Iterator[str]:
        chunks = ray_client.tail(
            client.tail_job_logs(job_id),
            quiet_s=ray_client.request_timeout(),
            ended=lambda: _state(self._info(job_id)).finished,
        )
        try:
            while True:
                with self._errors(job_id):
                    chunk = next(chunks, None)
                if chunk is None:
                    return
                yield chunk
        finally:
            chunks.close()

    def stop(self, job_id: str, now: bool = False, wait_seconds: float = 600) -> JobState:
        """Gracefully: the stop request file, which the driver turns into a checkpoint and exit 75
        (Ray's own stop kills it a few seconds after SIGTERM). ``now``, or a job not started yet
        (nothing to save): Ray's stop."""
        info = self._info(job_id)
        state = _state(info)
        if state.finished:
            raise LaunchError(f"job '{job_id}' is already {state.state}: nothing to stop")
        if now or state.state == "PENDING":
            with self._errors(job_id):
                stopped = self._client().stop_job(job_id)
            if not stopped:  # it ended in the meantime
                ended = _state(self._info(job_id)).state
                raise LaunchError(f"job '{job_id}' is already {ended}: nothing to stop")
            waiting = f"job '{job_id}' has not ended {wait_seconds:g} s after Ray was asked to stop it"
        else:
            ray_rundir.request_stop(info)
            waiting = (
                f"job '{job_id}' has not ended {wait_seconds:g} s after the stop request: it is still "
                f"checkpointing, or stuck; wait longer (see 'sft-cluster status {job_id}') or end it "
                f"now with 'sft-cluster stop {job_id} --now' (steps since its last checkpoint are lost)"
            )
        deadline = time.monotonic() + wait_seconds
        while True:
            info = self._info(job_id)
            if _state(info).finished:
                return self._described(job_id, info)
            if time.monotonic() >= deadline:
                raise LaunchError(waiting)
            time.sleep(_POLL_S)

    def list(self) -> list[JobState]:
        client = self._client()
        with self._errors():
            jobs = client.list_jobs()
        states = [_state(info) for info in jobs if info.submission_id]
        return sorted(states, key=lambda s: s.start or 0)


# --- helpers -----------------------------------------------------------------------


def _state(info: Any) -> JobState:
    status = getattr(info.status, "value", str(info.status))
    metadata = info.metadata or {}
    ours = metadata.get("launcher") == "sft-cluster"
    if status == "FAILED" and ours and getattr(info, "driver_exit_code", None) == exitcodes.PREEMPTED:
        status = "PREEMPTED"  # the driver checkpointed on request and asked to be resumed
    return JobState(
        id=info.submission_id or info.job_id,
        state=status,
        name=metadata.get("job_name"),
        start=info.start_time / 1000 if info.start_time else None,
        end=info.end_time / 1000 if info.end_time else None,
        output_uri=metadata.get("output_uri"),
        exit_code=getattr(info, "driver_exit_code", None),
        message=(info.message or "").splitlines()[0]
        if info.message and status not in ("SUCCEEDED", "PREEMPTED")
        else None,
    )


def _new_id(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "job"
    return f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _runtime_path(value: str) -> str:
    """A plain local path made absolute, from the current directory; any URI unchanged, ``file://``
    included (a package Ray fetches on each node, where a local path is uploaded from here)."""
    return value if "://" in value else str(storage.absolute_path(value))
