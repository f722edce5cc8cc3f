"""Retry transient storage errors with backoff, so one dropped connection does not end an attempt.

Object stores and network filesystems fail now and then for reasons that go away (a reset
connection, a throttled request, a timed-out read). Those are retried with exponential
backoff; everything else (a missing file, a refused credential, a full disk) fails at once.
The S3 client's own retries are raised too (see ``storage_options_for``); this wraps our
calls for every other backend and for what outlasts the client's retries.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("sft_cluster.storage")
T = TypeVar("T")

ATTEMPTS = int(os.environ.get("SFT_CLUSTER_STORAGE_ATTEMPTS", "6"))
BASE_DELAY_S = float(os.environ.get("SFT_CLUSTER_STORAGE_BASE_DELAY_S", "0.5"))
_TRANSIENT_ERRNOS = {
    errno.EIO,
    errno.EAGAIN,
    errno.EBUSY,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
}
# Client libraries' names for a dropped or slow connection and for throttling.
_TRANSIENT_WORDS = ("Connection", "Timeout", "Throttl", "SlowDown", "ServiceUnavailable", "Endpoint")


def is_transient(exc: BaseException) -> bool:
    """True for errors that may go away when the same call is made again."""
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    names = [type(e).__name__ for e in (exc, exc.__cause__, exc.__context__) if e is not None]
    return any(word in name for name in names for word in _TRANSIENT_WORDS)


def retrying(fn: Callable[..., T], *args, what: str, attempts: int | None = None, **kwargs) -> T:
    """``fn(*args, **kwargs)``, again after a transient error (up to ``attempts`` calls in all)."""
    attempts = attempts or ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            delay = BASE_DELAY_S * 2 ** (attempt - 1) * (0.5 + random.random())
            log.warning(
                "%s failed (%s: %s); try %d of %d in %.1f s",
                what,
                type(exc).__name__,
                exc,
                attempt + 1,
                attempts,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")
