"""fsspec URIs for everything the project reads and writes.

Local paths, ``file://``, ``s3://``, ``gs://`` and ``memory://`` all go through
the same few functions, so no other module needs to know where a run lives.
Credentials are never passed here: fsspec backends take them from the
environment (``AWS_ACCESS_KEY_ID`` and friends).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from sft_cluster.storage.retry import is_transient, retrying

__all__ = [
    "absolute_path",
    "exists",
    "filesystem",
    "is_local",
    "is_transient",
    "join",
    "local_path",
    "read_text",
    "retrying",
    "storage_options_for",
    "upload_dir",
    "write_text",
]


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs."""
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    """The filesystem path of a local URI."""
    if not is_local(uri):
        raise ValueError(f"{uri} is not a local path")
    return Path(uri.removeprefix("file://")).expanduser()


def absolute_path(uri: str) -> Path:
    """The absolute path of a local URI, relative ones from the current directory: what a process
    started elsewhere (a worker, a batch job) must be given to find the same file."""
    return local_path(uri).absolute()


def storage_options_for(uri: str, endpoint_url: str | None, options: dict[str, Any]) -> dict:
    """fsspec options for ``uri``: the job's options plus the S3 endpoint, if any."""
    merged = dict(options)
    if uri.startswith(("s3://", "s3a://")):
        if endpoint_url:
            client_kwargs = dict(merged.get("client_kwargs", {}))
            client_kwargs.setdefault("endpoint_url", endpoint_url)
            merged["client_kwargs"] = client_kwargs
        # botocore's "standard" mode retries throttling and dropped connections with backoff;
        # its default (legacy, 5 attempts) gives up within seconds of a blip.
        config = dict(merged.get("config_kwargs", {}))
        config.setdefault("retries", {"max_attempts": 10, "mode": "standard"})
        merged["config_kwargs"] = config
    return merged


def filesystem(uri: str, options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for ``uri``."""
    return url_to_fs(uri, **(options or {}))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/``, keeping the scheme."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(uri: str, options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(uri, options)
    return fs.exists(path)


def read_text(uri: str, options: dict[str, Any] | None = None) -> str:
    fs, path = filesystem(uri, options)
    with fs.open(path, "r", encoding="utf-8") as handle:
        return handle.read()


def read_range(uri: str, start: int, end: int, options: dict[str, Any] | None = None) -> bytes:
    """Bytes [start, end) of an object: one ranged read, retried like any other request."""
    fs, path = filesystem(uri, options)
    return retrying(fs.cat_file, path, start=start, end=end, what=f"reading {uri}")


def write_text(uri: str, text: str, options: dict[str, Any] | None = None) -> None:
    """Write ``text`` so a reader sees the old content or the new, never a part (``write_bytes``)."""
    write_bytes(uri, text.encode("utf-8"), options)


def write_bytes(uri: str, data: bytes, options: dict[str, Any] | None = None) -> None:
    """Write ``data`` so a reader sees the old content or the new, never a part.

    Local files go through a temporary file and ``os.replace``; an object store
    PUT is atomic by itself.
    """
    if is_local(uri):
        target = local_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    fs, path = filesystem(uri, options)

    def put() -> None:
        with fs.open(path, "wb") as handle:
            handle.write(data)

    retrying(put, what=f"writing {uri}")


def upload_dir(local_dir: Path, uri: str, options: dict[str, Any] | None = None) -> None:
    """Copy a local folder to ``uri`` (a no-op when ``uri`` is that folder)."""
    if is_local(uri) and local_path(uri).resolve() == local_dir.resolve():
        return
    fs, path = filesystem(uri, options)
    fs.put(str(local_dir).rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
