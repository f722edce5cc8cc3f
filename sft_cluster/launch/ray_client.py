"""The connection to a Ray dashboard: where, who, and a Jobs client whose every request has a timeout.

Ray's ``JobSubmissionClient`` sends each request with ``requests`` and no
timeout, so an address that accepts TCP and never answers (or drops packets)
hangs a command forever. :func:`connect` returns a client that gives each
request ``SFT_CLUSTER_RAY_TIMEOUT_S`` seconds (default 30) to connect and
to answer; :func:`tail` follows the log stream, which may rightly be silent for
long, by asking about the job after each silence; :func:`explain` turns any
failure into one line the user can act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from sft_cluster.launch.base import LaunchError

TIMEOUT_ENV = "SFT_CLUSTER_RAY_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 30.0
ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
TOKEN_VARS = ("RAY_AUTH_TOKEN",)


def address_of(cluster: Any, cluster_file: str) -> tuple[str, str]:
    """(address, where it came from): the cluster file, else the environment."""
    if cluster.address:
        return cluster.address, cluster_file
    for name in ADDRESS_VARS:
        if os.environ.get(name):
            return os.environ[name], f"${name}"
    raise LaunchError(
        f"{cluster_file}: no Ray address: set 'address: http://HEAD:8265' in the cluster "
        "file or RAY_API_SERVER_ADDRESS in the environment"
    )


def token_of(cluster: Any, cluster_file: str) -> str | None:
    """The auth token (``auth.mode: token``), from ``$auth.token_env`` or ``auth.token_file``."""
    auth = cluster.auth
    if auth.mode != "token":
        return None
    value = os.environ.get(auth.token_env, "").strip()
    if value:
        return value
    if auth.token_file:
        try:
            value = Path(auth.token_file).expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise LaunchError(
                f"{cluster_file}: auth.token_file = '{auth.token_file}': cannot read it "
                f"({exc.strerror or exc}); or set ${auth.token_env}"
            ) from None
        if value:
            return value
        raise LaunchError(f"{cluster_file}: auth.token_file = '{auth.token_file}' is empty")
    raise LaunchError(
        f"{cluster_file}: auth.mode is 'token' but ${auth.token_env} is not set "
        "(export the cluster's token, or set auth.token_file)"
    )


def token_source(auth: Any) -> str:
    """Where the token was read: the variable, else the file."""
    if not os.environ.get(auth.token_env) and auth.token_file:
        return auth.token_file
    return f"${auth.token_env}"


def auth_words(auth: Any) -> str:
    """How requests authenticate, for a dry run: never the token itself."""
    if auth.mode != "token":
        return "none"
    return f"token from {token_source(auth)} (sent as an Authorization header; never stored)"


def request_timeout() -> float:
    """Seconds each request may take to connect, and then to answer (``$SFT_CLUSTER_RAY_TIMEOUT_S``)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise LaunchError(f"${TIMEOUT_ENV} = '{raw}': must be a positive number of seconds")
    return value


def connect(address: str, headers: dict[str, str] | None, timeout: float) -> Any:
    """A ``JobSubmissionClient`` for ``address`` whose requests time out after ``timeout`` s."""
    with _without_env(ADDRESS_VARS):
        from ray.job_submission import JobSubmissionClient

        class TimedClient(JobSubmissionClient):
            # Every request of the SDK (version check, upload, submit, ...) goes through here;
            # Ray forwards extra keywords to requests.request.
            def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
                kwargs.setdefault("timeout", timeout)
                return super()._do_request(method, endpoint, **kwargs)

        _quiet_ray_logs()
        return TimedClient(address, headers=headers)


def tail(stream: AsyncIterator[str], quiet_s: float, ended: Callable[[], bool]) -> Iterator[str]:
    """The chunks of Ray's log stream (``tail_job_logs``), which has no timeout of its own.

    After each ``quiet_s`` of silence ``ended()`` asks the head about the job: a
    head that does not answer raises there, and a job that has ended ends the stream.
    """
    loop = asyncio.new_event_loop()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(stream), loop=loop)
            loop.run_until_complete(asyncio.wait({pending}, timeout=quiet_s))
            if not pending.done():
                if ended():
                    return
                continue
            done, pending = pending, None
            try:
                yield done.result()
            except StopAsyncIteration:
                return
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(pending)
        with contextlib.suppress(Exception):
            loop.run_until_complete(stream.aclose())  # type: ignore[attr-defined]
        loop.close()


def timed_out(exc: BaseException) -> bool:
    """True when ``exc`` (or what it was raised from) is a timeout.

    Ray re-raises a connect timeout in its version check as a plain ConnectionError.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TimeoutError) or type(seen).__name__ in ("ConnectTimeout", "ReadTimeout"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def explain(exc: Exception, where: str, source: str, job_id: str | None, auth: Any, cluster_file: str) -> str:
    """One line for a failed request to ``where`` (the cluster at an address from ``source``)."""
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    if name == "AuthenticationError" or "status code 401" in text or "status code 403" in text:
        if auth.mode != "token":
            return (
                f"{where} requires a token: set 'auth: {{mode: token}}' in {cluster_file} "
                f"and export the token as ${auth.token_env}"
            )
        return f"{where} rejected the token from {token_source(auth)}: check it"
    if timed_out(exc):
        return (
            f"{where} (address from {source}) did not answer within {request_timeout():g} s: is this "
            f"the dashboard's address, and is the head up and not overloaded? (${TIMEOUT_ENV} sets the limit)"
        )
    if name == "ConnectionError" or "Failed to connect" in text or "Connection refused" in text:
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
        return f"no job '{job_id}' on {where} (see 'sft-cluster list --cluster {cluster_file}')"
    if "JSONDecodeError" in name or "Expecting value" in text:
        return f"{where} does not answer like a Ray dashboard ({name}); check the address"
    return f"{where}: {text[:300] or name}"


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
