"""Listing a source's objects: compact records page by page, S3 prefixes concurrently.

``fs.find(detail=True)`` builds a dict of full info dicts for every object
(and s3fs keeps them in the filesystem's directory cache for as long as the
cached instance lives): about a GB of Python objects at 1,000,000 objects, from
one sequential listing. On S3 this module turns each ListObjectsV2 page into
``ObjectInfo`` records as it arrives and lists the prefix's sub-prefixes
concurrently. Globs keep ``fs.glob`` (details of the matches only), and every
other filesystem keeps ``fs.find``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.asyn import sync

if TYPE_CHECKING:
    from s3fs import S3FileSystem

PAGE_SIZE = 1000  # the most S3 returns in one page
CONCURRENCY = 16  # sub-prefix listings in flight
MAX_FANOUT = 1000  # more sub-prefixes than this: one request each costs more than one listing of all


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One listed object: enough to read it and to notice when it changed."""

    uri: str
    size: int
    version: str | None = None  # ETag, or mtime where the store gives no ETag


def version_of(info: dict[str, Any]) -> str | None:
    """What changes when the object does: the ETag, else a timestamp."""
    for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "updated", "created"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return None


def list_path(
    fs: fsspec.AbstractFileSystem,
    path: str,
    keep: Callable[[str], bool],
    page_size: int = PAGE_SIZE,
    concurrency: int = CONCURRENCY,
) -> list[ObjectInfo]:
    """The objects ``path`` names, sorted by URI: a glob's matches (``fs.glob``), every object
    below a prefix that ``keep`` accepts, or the single object ``path`` is (kept as named).

    ``page_size`` and ``concurrency`` apply to the S3 listing only.
    """
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    scheme = "" if protocol in ("file", "local") else f"{protocol}://"
    s3fs = sys.modules.get("s3fs")  # loaded if and only if ``fs`` can be an S3FileSystem
    if any(ch in path for ch in "*?["):
        found = fs.glob(path, detail=True)
    elif s3fs and isinstance(fs, s3fs.S3FileSystem) and not fs.version_aware:
        bucket, key, _ = fs.split_path(path)
        listing = _S3Listing(fs, bucket, scheme, keep, page_size, concurrency)
        return sorted(sync(fs.loop, listing.run, key), key=lambda obj: obj.uri)
    else:
        found = fs.find(path, detail=True)
        if len(found) > 1 or path.rstrip("/") not in found:
            found = {name: info for name, info in found.items() if keep(name)}
    objects = []
    for name in sorted(found):
        info = found[name]
        if info.get("type", "file") != "file":
            continue
        if "size" not in info:  # a generic find() names a single file without details
            info = fs.info(name)
        objects.append(ObjectInfo(scheme + name, int(info["size"]), version_of(info)))
    return objects


class _S3Listing:
    """One listing of an S3 prefix: the sub-prefixes and direct objects with ``Delimiter='/'``,
    then each sub-prefix recursively, ``concurrency`` at a time.

    Every page goes through ``fs._call_s3`` (s3fs's retries and error translation, so a missing
    bucket or bad credentials raise as they do from ``fs.find``) and is dropped once converted.
    """

    def __init__(
        self,
        fs: S3FileSystem,
        bucket: str,
        scheme: str,
        keep: Callable[[str], bool],
        page_size: int,
        concurrency: int,
    ):
        self.fs, self.bucket, self.scheme, self.keep = fs, bucket, scheme, keep
        self.page_size, self.concurrency = page_size, concurrency
        self.listed = 0  # keys seen, kept or not
        self.subprefixes: list[str] = []  # from the listing with a delimiter

    async def run(self, key: str) -> list[ObjectInfo]:
        prefix = f"{key.rstrip('/')}/" if key else ""
        objects = await self._collect(prefix, "/")
        if len(self.subprefixes) > MAX_FANOUT:
            objects = await self._collect(prefix)
        elif self.subprefixes:
            gate = asyncio.Semaphore(self.concurrency)

            async def below(subprefix: str) -> list[ObjectInfo]:
                async with gate:
                    return await self._collect(subprefix)

            tasks = [asyncio.ensure_future(below(subprefix)) for subprefix in self.subprefixes]
            try:  # gather raises the first error itself; the other listings are then cancelled
                for part in await asyncio.gather(*tasks):
                    objects += part
            finally:
                for task in tasks:
                    task.cancel()
        if not self.listed and not self.subprefixes and key:  # nothing below: maybe an object
            return await self._single(key)
        return objects

    async def _collect(self, prefix: str, delimiter: str = "") -> list[ObjectInfo]:
        """The objects of one paginated listing, each page converted as it arrives."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": self.page_size}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        objects: list[ObjectInfo] = []
        while True:
            page = await self.fs._call_s3("list_objects_v2", **kwargs)
            contents = page.get("Contents", ())
            self.listed += len(contents)
            for entry in contents:
                name = f"{self.bucket}/{entry['Key']}"
                if self.keep(name):
                    objects.append(ObjectInfo(self.scheme + name, int(entry["Size"]), version_of(entry)))
            self.subprefixes += [common["Prefix"] for common in page.get("CommonPrefixes", ())]
            if not page.get("IsTruncated"):
                return objects
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    async def _single(self, key: str) -> list[ObjectInfo]:
        """The object ``key`` names, unfiltered, as ``fs.find`` gives it; none if there is none."""
        name = f"{self.bucket}/{key}"
        try:
            info = await self.fs._info(name)
        except FileNotFoundError:
            return []
        if info.get("type") != "file":
            return []
        return [ObjectInfo(self.scheme + name, int(info["size"]), version_of(info))]
