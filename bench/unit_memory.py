"""A rank's peak memory reading one big object: bounded by a unit now, by the object before.

    .venv/bin/python bench/unit_memory.py                  # 2048 MB vs 50 MB objects
    .venv/bin/python bench/unit_memory.py --big-mb 300     # a quick check

Writes a Parquet file (row groups of ``--group-mb``) and a ``.jsonl.zst`` of chat
records (``{"messages": [...]}``, text of random letters so the compressed size is
close to the raw one) at ``--small-mb`` and ``--big-mb``, then reads every record
of each, in a fresh subprocess per case, and prints its peak RSS (VmHWM):

- now: ``RankStream.one_pass`` of a one-rank plan from ``make_plan`` (Parquet cut
  into byte-range units here if the planner still gives one whole-object unit);
- before (baseline): the reader as it was before units were read lazily, copied
  below: the whole object as a list, shuffled, then each record parsed.

The target: the big object's peak within 1.2x of the small one's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench._common import peak_rss_mb  # noqa: E402

BLOCK_RECORDS = 4096  # records generated once and repeated
MB = 1 << 20


def _records(rng: random.Random) -> list[dict[str, Any]]:
    """Chat records of about 1 KB: 1-3 exchanges of random-letter words."""

    def words(count: int) -> str:
        return " ".join(
            "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(count)
        )

    out = []
    for index in range(BLOCK_RECORDS):
        turns = []
        for _ in range(rng.choice((1, 2, 3))):
            turns.append({"role": "user", "content": f"{index} " + words(rng.randint(20, 60))})
            turns.append({"role": "assistant", "content": words(rng.randint(20, 80))})
        out.append({"messages": turns})
    return out


def write_parquet(path: Path, target_mb: int, group_mb: int, block: list[dict[str, Any]]) -> int:
    """Repeats the block's rows into row groups of about ``group_mb`` until the file is ``target_mb``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(block)
    group = pa.concat_tables([table] * max(1, group_mb * MB // max(table.nbytes, 1)))
    rows = 0
    with pq.ParquetWriter(path, group.schema) as writer:
        while path.stat().st_size < target_mb * MB:
            writer.write_table(group, row_group_size=len(group))
            rows += len(group)
    return rows


def write_zst(path: Path, target_mb: int, block: list[dict[str, Any]]) -> int:
    """Repeats one compressed frame of the block's lines (zstd reads concatenated frames as one)."""
    import zstandard

    frame = zstandard.ZstdCompressor(level=3).compress("".join(json.dumps(r) + "\n" for r in block).encode())
    rows = 0
    with path.open("wb") as out:
        while out.tell() < target_mb * MB:
            out.write(frame)
            rows += len(block)
    return rows


class _LengthOnly:
    """A ChatEncoder stand-in: two tokens, one trained (tokenizing is not what is measured)."""

    def encode(self, conversation: Any, tools: Any = None) -> tuple[list[int], list[int]]:
        return [1, 2], [0, 1]


def read_now(path: str) -> int:
    """Every record through ``RankStream.one_pass`` of a one-rank plan for this one object."""
    from sft_cluster.data.plan import DEFAULT_CHUNK_BYTES, Unit, make_plan
    from sft_cluster.data.reader import RankStream
    from sft_cluster.data.records import list_objects
    from sft_cluster.spec import DataSpec, StorageSpec

    data, store = DataSpec.model_validate({"sources": [{"uri": path}]}), StorageSpec()
    objects = list_objects(data.sources[0], data, store)
    plan = make_plan(data, [objects], 1, seed=0)
    units = list(plan.sources[0].ranks[0])
    if path.endswith(".parquet") and units[0].end is None:  # the planner does not cut Parquet yet
        size = objects[0].size
        units = [
            Unit(0, start, min(start + DEFAULT_CHUNK_BYTES, size))
            for start in range(0, size, DEFAULT_CHUNK_BYTES)
        ]
        plan = dataclasses.replace(plan, sources=[dataclasses.replace(plan.sources[0], ranks=[units])])
    print(f"  units: {len(units)}", file=sys.stderr)
    return sum(1 for _ in RankStream(plan, 0, data, store, _LengthOnly()).one_pass())


# --- baseline: the reader before units were read lazily (kept here only to compare against) ---


def _baseline_iter_raw(uri: str, fmt: str, compression: str | None):
    """``records.iter_raw`` as it was (Parquet and JSONL branches)."""
    import io

    import fsspec

    with fsspec.open(uri, "rb", compression=compression) as handle:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            row = 0
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    row += 1
                    yield row, record
        else:
            for line_no, line in enumerate(io.BufferedReader(handle, 1 << 20), start=1):
                if line.strip():
                    yield line_no, line


def read_before(path: str) -> int:
    """The old whole-object unit: ``list(iter_raw(...))``, shuffled, then each record parsed."""
    from sft_cluster.data.records import format_of, record_location, to_conversation

    fmt, compression = format_of(path, None)
    records = list(_baseline_iter_raw(path, fmt, compression))
    random.Random(0).shuffle(records)
    for number, raw in records:
        to_conversation(raw, {}, lambda number=number: record_location(path, fmt, number))
    return len(records)


# --- end of baseline ---


def child(mode: str, path: str) -> None:
    """One case; both readers import the stream first, so its imports weigh the same on both."""
    import sft_cluster.data.reader  # noqa: F401

    start = time.perf_counter()
    count = (read_now if mode == "now" else read_before)(path)
    print(json.dumps({"records": count, "peak_mb": peak_rss_mb(), "seconds": time.perf_counter() - start}))


def measure(mode: str, path: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"{mode} {path.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--big-mb", type=int, default=2048)
    parser.add_argument("--small-mb", type=int, default=50)
    parser.add_argument("--group-mb", type=int, default=16, help="Parquet row group size (raw)")
    parser.add_argument("--dir", default="/tmp", help="local disk for the files (removed after)")
    parser.add_argument("--skip-before", action="store_true", help="skip the baseline (it holds the object)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    need = 2.2 * (args.big_mb + args.small_mb) * MB
    free = shutil.disk_usage(args.dir).free
    if free < need:
        raise SystemExit(f"{args.dir} has {free // MB} MB free, {need // MB:.0f} MB needed")
    block = _records(random.Random(0))
    modes = ("now",) if args.skip_before else ("now", "before")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="unit-memory-") as tmp:
        results: dict[tuple[str, str, str], dict[str, Any]] = {}
        for kind in ("parquet", "jsonl.zst"):
            for label, size in (("small", args.small_mb), ("big", args.big_mb)):
                path = Path(tmp) / f"{label}.{kind}"
                began = time.perf_counter()
                if kind == "parquet":
                    rows = write_parquet(path, size, args.group_mb, block)
                else:
                    rows = write_zst(path, size, block)
                print(
                    f"wrote {path.name}: {path.stat().st_size / MB:.0f} MB, {rows} records "
                    f"in {time.perf_counter() - began:.1f} s",
                    flush=True,
                )
                for mode in modes:
                    result = measure(mode, path)
                    if result["records"] != rows:
                        raise SystemExit(f"{mode} read {result['records']} of {rows} records of {path.name}")
                    results[(kind, label, mode)] = result
                    print(
                        f"  {mode:6} peak {result['peak_mb']:8.0f} MB  {result['seconds']:6.1f} s", flush=True
                    )
                path.unlink()
        print(f"\npeak RSS (MB), {args.small_mb} MB vs {args.big_mb} MB objects")
        print(f"{'format':10} {'reader':8} {'small':>8} {'big':>8} {'big/small':>10}")
        for kind in ("parquet", "jsonl.zst"):
            for mode in modes:
                small, big = (
                    results[(kind, "small", mode)]["peak_mb"],
                    results[(kind, "big", mode)]["peak_mb"],
                )
                print(f"{kind:10} {mode:8} {small:8.0f} {big:8.0f} {big / small:10.2f}")


if __name__ == "__main__":
    main()
