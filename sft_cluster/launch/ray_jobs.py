"""Ray Jobs: submit the driver to an existing Ray cluster through its dashboard.

The submission is one HTTP request built by :meth:`RayJobsBackend.request`:

- ``entrypoint``: ``python -m sft_cluster.driver --job-env SFT_CLUSTER_JOB_YAML``,
  run by the cluster's ``python`` in the uploaded ``working_dir``;
- ``runtime_env``: the working_dir (this project, minus the cluster file's
  ``excludes`` and ``.gitignore``), ``py_modules``, an optional ``image_uri``,
  and ``env_vars``: the cluster file's, the submitter's ``pass_env`` variables
  (copied at submit time) and the resolved job YAML itself. Keeping the job in
  an environment variable leaves the package unchanged between submissions,
  so Ray uploads the project once and reuses it.
- ``metadata``: ``job_name``, ``output_uri``, the cluster file's metadata.

The auth token travels only in the ``Authorization`` header of each request;
it is never written into the runtime_env, the job or anything printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sft_cluster.launch.base import JobState, LaunchError, Submission
from sft_cluster.spec import JobSpec, RayCluster, dump_job_yaml

JOB_ENV = "SFT_CLUSTER_JOB_YAML"
ENTRYPOINT = f"python -m sft_cluster.driver --job-env {JOB_ENV}"
_ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
_TOKEN_VARS = ("RAY_AUTH_TOKEN",)
# Whole words of a variable name, so TOKENIZERS_PARALLELISM is not a credential.
_CREDENTIAL = re.compile(
    r"(?:^|_)(?:API)?(?:KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIALS?|SESSION)S?(?:_|$)", re.IGNORECASE
)
_URL_USERINFO = re.compile(r"(://)[^/@\s:]+:[^/@\s]+@")
LOG_TAIL_LINES = 15


def _redact_text(text: str) -> str:
    """Hide ``user:password@`` in URLs."""
    return _URL_USERINFO.sub(r"\1<redacted>@", text)


class RayJobsBackend:
    """``submit``/``status``/``logs``/``stop``/``list`` for ``kind: ray`` cluster files."""

    kind = "ray"

    def __init__(self, cluster: RayCluster, cluster_file: str):
        self.cluster = cluster
        self.cluster_file = cluster_file
        self._client_cache: Any = None

    # --- where and who -----------------------------------------------------------

    def address(self) -> tuple[str, str]:
        """(address, where it came from): the cluster file, else the environment."""
        if self.cluster.address:
            return self.cluster.address, self.cluster_file
        for name in _ADDRESS_VARS:
            if os.environ.get(name):
                return os.environ[name], f"${name}"
        raise LaunchError(
            f"{self.cluster_file}: no Ray address: set 'address: http://HEAD:8265' in the cluster "
            "file or RAY_API_SERVER_ADDRESS in the environment"
        )

    def token(self) -> str | None:
        """The auth token (``auth.mode: token``), from ``$auth.token_env`` or ``auth.token_file``."""
        auth = self.cluster.auth
        if auth.mode != "token":
            return None
        value = os.environ.get(auth.token_env, "").strip()
        if value:
            return value
        if auth.token_file:
            path = Path(auth.token_file).expanduser()
            try:
                value = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise LaunchError(
                    f"{self.cluster_file}: auth.token_file = '{auth.token_file}': cannot read it "
                    f"({exc.strerror or exc}); or set ${auth.token_env}"
                ) from None
            if value:
                return value
            raise LaunchError(f"{self.cluster_file}: auth.token_file = '{auth.token_file}' is empty")
        raise LaunchError(
            f"{self.cluster_file}: auth.mode is 'token' but ${auth.token_env} is not set "
            "(export the cluster's token, or set auth.token_file)"
        )

    def _token_source(self) -> str:
        auth = self.cluster.auth
        if not os.environ.get(auth.token_env) and auth.token_file:
            return auth.token_file
        return f"${auth.token_env}"

    def _auth_words(self) -> str:
        if self.cluster.auth.mode != "token":
            return "none"
        return f"token from {self._token_source()} (sent as an Authorization header; never stored)"

    # --- the request -------------------------------------------------------------

    def passed_env(self) -> dict[str, str]:
        """The submitter's variables named (or globbed) by ``runtime_env.pass_env``."""
        patterns = self.cluster.runtime_env.pass_env
        never = {*_TOKEN_VARS, self.cluster.auth.token_env, *_ADDRESS_VARS, JOB_ENV}
        return {
            name: value
            for name, value in sorted(os.environ.items())
            if name not in never and any(fnmatch.fnmatchcase(name, p) for p in patterns)
        }

    def missing_pass_env(self) -> list[str]:
        """Exact ``pass_env`` names (not globs) absent from the submitter's environment."""
        return [
            name
            for name in self.cluster.runtime_env.pass_env
            if not any(c in name for c in "*?[") and name not in os.environ
        ]

    def runtime_env(self, job_yaml: str) -> dict[str, Any]:
        spec = self.cluster.runtime_env
        env: dict[str, Any] = {}
        if spec.working_dir:
            env["working_dir"] = _local_or_uri(spec.working_dir)
            env["excludes"] = list(spec.excludes)
        if spec.py_modules:
            env["py_modules"] = [_local_or_uri(m) for m in spec.py_modules]
        if spec.image_uri:
            env["image_uri"] = spec.image_uri
        env["env_vars"] = {
            **spec.env_vars,
            **self.passed_env(),
            # The driver's ray.init adds worker settings: let them win over ours.
            "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
            JOB_ENV: job_yaml,
        }
        return env

    def request(self, job: JobSpec, submission_id: str | None = None) -> dict[str, Any]:
        """Everything ``JobSubmissionClient.submit_job`` receives for ``job``."""
        job = _anchor(job)
        metadata = {
            **self.cluster.metadata,
            "job_name": job.name,
            "output_uri": job.output_uri,
            "launcher": "sft-cluster",
        }
        request: dict[str, Any] = {
            "submission_id": submission_id or _new_id(job.name),
            "entrypoint": ENTRYPOINT,
            "runtime_env": self.runtime_env(dump_job_yaml(job)),
            "metadata": metadata,
            "entrypoint_num_cpus": self.cluster.entrypoint_num_cpus,
        }
        if self.cluster.entrypoint_resources:
            request["entrypoint_resources"] = dict(self.cluster.entrypoint_resources)
        return request

    def render(self, request: dict[str, Any]) -> str:
        """The dry run: the request as text, secrets redacted."""
        passed = set(self.passed_env())
        shown = json.loads(json.dumps(request))
        env_vars = shown["runtime_env"]["env_vars"]
        job_yaml = env_vars[JOB_ENV]
        env_vars[JOB_ENV] = f"<the resolved job below, {len(job_yaml)} bytes>"
        for name in env_vars:
            if name in passed:
                env_vars[name] = f"<redacted: ${name} of the submitting shell>"
            elif _CREDENTIAL.search(name):
                env_vars[name] = "<redacted>"
        try:
            address, source = self.address()
            where = f"{address} (from {source})"
        except LaunchError:
            where = "<not set: RAY_API_SERVER_ADDRESS at submit time>"
        lines = [
            "# dry run: nothing was submitted",
            f"# address: {_redact_text(where)}",
            f"# auth: {self._auth_words()}",
        ]
        lines += [f"# warning: {w}" for w in self._warnings()]
        lines += [
            "",
            f"entrypoint: {shown['entrypoint']}",
            "request:",
            json.dumps({k: v for k, v in shown.items() if k != "entrypoint"}, indent=2),
            "",
            f"# resolved job (runtime_env.env_vars.{JOB_ENV}):",
            job_yaml.rstrip(),
        ]
        return _redact_text("\n".join(lines))

    def _warnings(self) -> list[str]:
        missing = self.missing_pass_env()
        if not missing:
            return []
        return [f"runtime_env.pass_env: not set here, not passed: {', '.join(missing)}"]

    # --- talking to the cluster ----------------------------------------------------

    def _client(self) -> Any:
        if self._client_cache is not None:
            return self._client_cache
        address, _ = self.address()
        token = self.token()
        headers = {"Authorization": f"Bearer {token}"} if token else None
        with self._errors(), _without_env(_ADDRESS_VARS):
            from ray.job_submission import JobSubmissionClient

            _quiet_ray_logs()
            self._client_cache = JobSubmissionClient(address, headers=headers)
        return self._client_cache

    @contextlib.contextmanager
    def _errors(self, job_id: str | None = None) -> Iterator[None]:
        """Every failure of a request as a one-line LaunchError the user can act on."""
        try:
            address, source = self.address()
        except LaunchError:
            address, source = "?", "?"
        where = f"the Ray cluster at {_redact_text(address)}"
        try:
            yield
        except LaunchError:
            raise
        except Exception as exc:
            raise LaunchError(self._explain(exc, where, source, job_id)) from None

    def _explain(self, exc: Exception, where: str, source: str, job_id: str | None) -> str:
        text = " ".join(str(exc).split())
        name = type(exc).__name__
        auth = self.cluster.auth
        if name == "AuthenticationError" or "status code 401" in text or "status code 403" in text:
            if self.cluster.auth.mode != "token":
                return (
                    f"{where} requires a token: set 'auth: {{mode: token}}' in {self.cluster_file} "
                    f"and export the token as ${auth.token_env}"
                )
            return f"{where} rejected the token from {self._token_source()}: check it"
        if name in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout") or (
            "Failed to connect" in text or "Connection refused" in text
        ):
            return (
                f"cannot reach {where} (address from {source}): is the cluster up, is this the "
                "dashboard's http address (default port 8265), and does the head run the "
                "dashboard (ray[default])?"
            )
        if "Version check returned 404" in text or ("status code 404" in text and job_id is None):
            return (
                f"{where} has no Ray Jobs API: is the address the dashboard's (port 8265), and is "
                "the dashboard running (ray[default] installed, not --include-dashboard=false)?"
            )
        if job_id is not None and ("does not exist" in text or "status code 404" in text):
            return f"no job '{job_id}' on {where} (see 'sft-cluster list --cluster {self.cluster_file}')"
        if "JSONDecodeError" in name or "Expecting value" in text:
            return f"{where} does not answer like a Ray dashboard ({name}); check the address"
        first = text[:300] or name
        return f"{where}: {first}"

    # --- the Backend protocol ----------------------------------------------------

    def submit(self, job: JobSpec, dry_run: bool = False) -> Submission | str:
        request = self.request(job)
        if dry_run:
            return self.render(request)
        for warning in self._warnings():
            print(f"warning: {warning}", file=sys.stderr)
        client = self._client()
        address, _ = self.address()
        with self._errors():
            submission_id = client.submit_job(**request)
        return Submission(
            id=submission_id,
            backend=self.kind,
            cluster_file=self.cluster_file,
            name=job.name,
            output_uri=request["metadata"]["output_uri"],
            submitted_at=time.time(),
            extra={"address": _redact_text(address)},
        )

    def _info(self, job_id: str) -> Any:
        client = self._client()
        with self._errors(job_id):
            return client.get_job_info(job_id)

    def status(self, job_id: str) -> JobState:
        info = self._info(job_id)
        state = _state(info)
        if state.state == "FAILED":
            state.message = self._failure(job_id, info)
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
        loop = asyncio.new_event_loop()
        stream = client.tail_job_logs(job_id)
        try:
            while True:
                with self._errors(job_id):
                    try:
                        chunk = loop.run_until_complete(stream.__anext__())
                    except StopAsyncIteration:
                        return
                yield chunk
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(stream.aclose())
            loop.close()

    def stop(self, job_id: str) -> None:
        client = self._client()
        with self._errors(job_id):
            stopped = client.stop_job(job_id)
        if not stopped:
            state = _state(self._info(job_id)).state
            raise LaunchError(f"job '{job_id}' is already {state}: nothing to stop")

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
    return JobState(
        id=info.submission_id or info.job_id,
        state=status,
        name=metadata.get("job_name"),
        start=info.start_time / 1000 if info.start_time else None,
        end=info.end_time / 1000 if info.end_time else None,
        output_uri=metadata.get("output_uri"),
        message=(info.message or "").splitlines()[0] if info.message and status != "SUCCEEDED" else None,
    )


def _new_id(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "job"
    return f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _local_or_uri(value: str) -> str:
    """Local paths as absolute paths (from the current directory); URIs unchanged."""
    if "://" in value:
        return value
    return str(Path(value).expanduser().absolute())


def _anchor(job: JobSpec) -> JobSpec:
    """Relative local paths would land in Ray's scratch working_dir: make them absolute."""
    from sft_cluster.launch.local import anchor_local_paths

    return anchor_local_paths(job)


def _quiet_ray_logs() -> None:
    """Ray's client logs each packaging step at INFO: keep its errors, drop the chatter."""
    for handler in logging.getLogger("ray").handlers:
        handler.setLevel(logging.ERROR)


@contextlib.contextmanager
def _without_env(names: tuple[str, ...]) -> Iterator[None]:
    """Ray's client lets RAY_ADDRESS override its address argument: the cluster file wins here."""
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
