"""Listing a large S3 prefix: the streamed, concurrent listing beside ``fs.find``, in one run.

    .venv/bin/python bench/listing.py                   # 100,000 objects
    .venv/bin/python bench/listing.py --objects 5000    # a quick check

Uploads ``--objects`` tiny ``.jsonl`` objects spread over ``--prefixes``
sub-prefixes (plus a ``_SUCCESS`` in each, which the listing drops) to a
SeaweedFS started as the tests start it, then lists the prefix in fresh
subprocesses, ``--runs`` times each side, alternating:

- before: ``list_objects`` as it was (copied below): ``fs.find(detail=True)``,
  a dict of full info dicts for every object (kept in s3fs's directory cache
  afterwards), then ``ObjectInfo`` records (a dataclass without slots);
- now: ``list_objects`` (``sft_cluster.data.listing``): each page turned into
  ``ObjectInfo`` as it arrives, the sub-prefixes listed 16 at a time.

Measured, after a warm-up listing of an empty prefix (imports, S3 session):
wall time of the call (best of the runs), peak RSS (VmHWM) of the process and
above its RSS before the call, and RSS still held after the call returns (the
result included). Both sides must return the same objects (checked by a digest).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SIDES = ("before", "now")


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` figure in MiB. Not ``ru_maxrss``: Linux carries that over across exec."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 1024


def upload(server, objects: int, prefixes: int) -> str:
    """``objects`` tiny objects over ``prefixes`` sub-prefixes, put concurrently; the s3:// prefix."""
    import s3fs

    bucket = server.make_bucket()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.endpoint}, skip_instance_cache=True)
    keys = [f"data/p{i % prefixes:03d}/shard-{i:07d}.jsonl" for i in range(objects)]
    keys += [f"data/p{j:03d}/_SUCCESS" for j in range(min(prefixes, objects))]
    started = time.perf_counter()
    for at in range(0, len(keys), 10_000):
        fs.pipe({f"{bucket}/{key}": b'{"text": "x"}\n' for key in keys[at : at + 10_000]}, batch_size=64)
        print(f"  uploaded {min(at + 10_000, len(keys)):,} / {len(keys):,}", flush=True)
    print(f"  upload: {time.perf_counter() - started:.0f} s", flush=True)
    return f"s3://{bucket}/data"


@dataclasses.dataclass(frozen=True)
class _OldObjectInfo:
    uri: str
    size: int
    version: str | None = None


def list_before(source, data, store) -> list[_OldObjectInfo]:
    """``records.list_objects`` before ``sft_cluster.data.listing`` (prefix branch), as it was."""
    from sft_cluster import storage
    from sft_cluster.data.listing import version_of
    from sft_cluster.data.records import _listable, _source_uri, source_options

    fs, path = storage.filesystem(_source_uri(source), source_options(source, data, store))
    found = fs.find(path, detail=True)
    if len(found) > 1 or path.rstrip("/") not in found:
        found = {name: info for name, info in found.items() if _listable(name, source.format)}
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    objects = []
    for name in sorted(found):
        info = found[name]
        if info.get("type", "file") != "file":
            continue
        full = name if protocol in ("file", "local") else f"{protocol}://{name}"
        objects.append(_OldObjectInfo(full, int(info["size"]), version_of(info)))
    return objects


def child(side: str, prefix: str, endpoint: str) -> dict[str, Any]:
    from sft_cluster.data.records import list_objects
    from sft_cluster.spec import DataSpec, StorageSpec

    data = DataSpec.model_validate({"sources": [{"uri": prefix}]})
    store = StorageSpec(endpoint_url=endpoint)
    lister = list_before if side == "before" else list_objects
    warm = DataSpec.model_validate({"sources": [{"uri": prefix + "-empty"}]})
    lister(warm.sources[0], warm, store)  # imports, the S3 session and its connection, not measured
    gc.collect()
    rss_before = _status_mb("VmRSS")
    started = time.perf_counter()
    objects = lister(data.sources[0], data, store)
    elapsed = time.perf_counter() - started
    gc.collect()
    digest = hashlib.blake2b(digest_size=8)
    for obj in objects:
        digest.update(f"{obj.uri}\x1f{obj.size}\x1f{obj.version}\n".encode())
    return {
        "objects": len(objects),
        "digest": digest.hexdigest(),
        "seconds": elapsed,
        "rss_before_mb": rss_before,
        "peak_rss_mb": _status_mb("VmHWM"),
        "rss_held_mb": _status_mb("VmRSS"),
    }


def run_child(side: str, prefix: str, server) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", side, "--prefix", prefix, "--endpoint", server.endpoint]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = next((line for line in out.stdout.splitlines() if line.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"{side} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--prefixes", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", choices=SIDES, dest="side")
    parser.add_argument("--prefix")
    parser.add_argument("--endpoint")
    args = parser.parse_args()
    if args.side:
        print("RESULT " + json.dumps(child(args.side, args.prefix, args.endpoint)), flush=True)
        return
    from tests.fixtures.s3 import seaweedfs

    with tempfile.TemporaryDirectory(prefix="sftc-bench-listing-") as name, seaweedfs(Path(name)) as server:
        os.environ.update(server.env())  # this process and its children, as a job sees them
        prefix = upload(server, args.objects, args.prefixes)
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        for run in range(args.runs):
            for side in SIDES:
                runs[side].append(run_child(side, prefix, server))
                print(f"  run {run + 1}, {side}: {json.dumps(runs[side][-1])}", flush=True)
    first = runs["before"][0]
    if any(
        (r["objects"], r["digest"]) != (first["objects"], first["digest"]) for rs in runs.values() for r in rs
    ):
        raise SystemExit("the two listings differ")
    best = {
        side: {
            "seconds": min(r["seconds"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "listing_peak_mb": max(r["peak_rss_mb"] - r["rss_before_mb"] for r in rs),
            "rss_held_mb": max(r["rss_held_mb"] - r["rss_before_mb"] for r in rs),
        }
        for side, rs in runs.items()
    }
    print(
        f"\n{first['objects']:,} objects listed (of {args.objects:,} + {min(args.prefixes, args.objects)} "
        f"_SUCCESS) under {args.prefixes} sub-prefixes; best of {args.runs} runs"
    )
    print(f"{'':40}{'before (find)':>16}{'now':>16}{'before / now':>16}")
    rows = [
        ("wall time (s)", "seconds", "{:.2f}"),
        ("peak RSS of the process (MiB)", "peak_rss_mb", "{:,.0f}"),
        ("peak RSS above the start (MiB)", "listing_peak_mb", "{:,.1f}"),
        ("RSS still held after it (MiB)", "rss_held_mb", "{:,.1f}"),
    ]
    for label, key, fmt in rows:
        before, now = best["before"][key], best["now"][key]
        ratio = f"{before / now:.2f}x" if now > 0 else "-"
        print(f"{label:40}{fmt.format(before):>16}{fmt.format(now):>16}{ratio:>16}")


if __name__ == "__main__":
    main()
