"""The data planner at scale, today's beside the one before issue #16 (commit 36a691d), in one run.

    .venv/bin/python bench/plan.py [--objects 1000000] [--ranks 1024]

Both planners plan the same synthetic listing (``--objects`` ``.jsonl.zst``
objects of 50-60 MB, fixed seed; ``ObjectInfo`` records built directly, no
storage listing) for ``--ranks`` ranks. The old planner is extracted from git
into a temporary folder and imported from there; each side runs in its own
subprocess, so peak RSS (VmHWM) is that side's alone:

- the driver: ``make_plan``, then what the driver writes and the plan id
  (before: ``to_json`` + ``id``, a hash of the text made again; now:
  ``plan.encoded``, header + body + id, as ``RunDir.save_plan`` writes them);
- a rank, in a fresh process each: what it reads to find its units and the
  time to decode it and get the plan id (before: the whole plan through
  ``ShardPlan.from_json``; now: the header and its section through
  ``plan_files.decode``), for rank 0 and the rank with the largest section.

The targets (issue #16, at 1,000,000 objects x 1,024 ranks): make_plan + save
+ id under 10 s, peak RSS under 1 GiB, under 1 MB read per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BEFORE = "36a691d"
SEED = 16
MB = 10**6
SIDES = ("before", "now")


def _peak_rss_mb() -> float:
    """This process's peak RSS in MiB. Not ``ru_maxrss``: Linux carries that over from the parent."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def _listing(objects: int) -> list[Any]:
    """The synthetic listing, the same in every process: sizes of 50-60 MB and ETag-like versions."""
    from sft_cluster.data.records import ObjectInfo

    rng = random.Random(SEED)
    return [
        ObjectInfo(
            f"s3://bucket/sft/part-{i:07d}.jsonl.zst",
            rng.randrange(50 * MB, 60 * MB + 1),
            f"{rng.getrandbits(128):032x}",
        )
        for i in range(objects)
    ]


def child_plan(side: str, objects: int, ranks: int, work: Path) -> dict[str, Any]:
    """The driver's part: plan, serialise and name the plan, then write what it would store."""
    from sft_cluster.data.plan import make_plan
    from sft_cluster.spec.job import DataSpec

    data = DataSpec.model_validate({"sources": [{"uri": "s3://bucket/sft/*.jsonl.zst"}]})
    listing = [_listing(objects)]
    started = time.perf_counter()
    plan = make_plan(data, listing, ranks, SEED)
    planned = time.perf_counter()
    if side == "before":  # the old driver's save_plan: to_json(), then plan.id hashes to_json() again
        files = {"plan.json": plan.to_json().encode()}
        plan_id = plan.id
    else:  # RunDir.save_plan: plan.encoded, header and body, the id with them
        encoded = plan.encoded
        plan_id = plan.id
        files = {"plan.json": encoded.header.encode(), "plan.body": encoded.body}
    saved = time.perf_counter()
    for name, blob in files.items():
        (work / side).mkdir(exist_ok=True)
        (work / side / name).write_bytes(blob)
    result = {"make_plan_s": planned - started, "save_id_s": saved - planned, "id": plan_id}
    result["peak_rss_mb"] = _peak_rss_mb()
    result["stored_bytes"] = sum(len(blob) for blob in files.values())
    loads = [sum(u.nbytes(plan.sources[0].objects) for u in plan.sources[0].ranks[r]) for r in range(ranks)]
    result["imbalance"] = max(loads) / (sum(loads) / ranks)
    return result


def child_read(side: str, rank: int, work: Path) -> dict[str, Any]:
    """A rank's part: read what it needs of the stored plan, decode it, get the id its cursors name."""
    from sft_cluster.data.plan import ShardPlan  # imported before the clock starts: a rank has them

    if side == "now":
        from sft_cluster.data.plan_files import decode
    folder = work / side
    started = time.perf_counter()
    if side == "before":
        text = (folder / "plan.json").read_bytes()
        read = len(text)
        plan = ShardPlan.from_json(text.decode())
    else:
        header = (folder / "plan.json").read_bytes()
        read = len(header)
        with (folder / "plan.body").open("rb") as body:

            def read_range(start: int, end: int) -> bytes:
                nonlocal read
                body.seek(start)
                read += end - start
                return body.read(end - start)

            plan = decode(header.decode(), read_range, rank)
    decoded = time.perf_counter()
    plan_id = plan.id  # a rank's cursors name it (the stream's state)
    named = time.perf_counter()
    units = len(plan.sources[0].ranks[rank])
    return {
        "read_bytes": read,
        "decode_s": decoded - started,
        "id_s": named - decoded,
        "id": plan_id,
        "units": units,
        "peak_rss_mb": _peak_rss_mb(),
    }


def run_child(side: str, part: str, args: argparse.Namespace, work: Path, rank: int = 0) -> dict[str, Any]:
    """One side in a fresh process, importing sft_cluster from that side's tree only."""
    root = work / "old" if side == "before" else REPO
    cmd = [sys.executable, __file__, "--child", side, part, "--work", str(work), "--rank", str(rank)]
    cmd += ["--objects", str(args.objects), "--ranks", str(args.ranks)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    line = next((line for line in out.stdout.splitlines() if line.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise RuntimeError(
            f"{side} {part} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        )
    result = json.loads(line.removeprefix("RESULT "))
    print(f"  {side} {part}{f' (rank {rank})' * (part == 'read')}: {json.dumps(result)}", flush=True)
    return result


def child(args: argparse.Namespace) -> None:
    import sft_cluster

    side, part = args.child
    # The editable install must not win over PYTHONPATH: the old side imports the old tree.
    assert Path(sft_cluster.__file__).is_relative_to(os.environ["PYTHONPATH"]), sft_cluster.__file__
    work = Path(args.work)
    if part == "plan":
        result = child_plan(side, args.objects, args.ranks, work)
    else:
        result = child_read(side, args.rank, work)
    print("RESULT " + json.dumps(result), flush=True)


def largest_section(work: Path) -> int:
    """The rank whose section of today's body is the longest (every rank reads the same header)."""
    offsets = json.loads((work / "now" / "plan.json").read_text())["sections"]
    ranks = len(offsets) - 2  # the last section is the objects no rank reads
    return max(range(ranks), key=lambda r: offsets[r + 1] - offsets[r])


def report(args: argparse.Namespace, plans: dict[str, dict], reads: dict[str, dict], big: int) -> None:
    """The table: both sides, now/before, and the issue's targets (checked on today's side)."""
    b, n = plans["before"], plans["now"]
    for side in (b, n):
        side["planner_s"] = side["make_plan_s"] + side["save_id_s"]
    rows: list[tuple[str, dict, dict, str, str, float, tuple[float, str] | None]] = [
        ("make_plan (s)", b, n, "make_plan_s", "{:.2f}", 1, None),
        ("save + id (s)", b, n, "save_id_s", "{:.2f}", 1, None),
        ("planner: make_plan + save + id (s)", b, n, "planner_s", "{:.2f}", 1, (10, "< 10 s")),
        ("planner peak RSS (MiB)", b, n, "peak_rss_mb", "{:,.0f}", 1, (1024, "< 1 GiB")),
        ("plan stored (MB)", b, n, "stored_bytes", "{:.1f}", MB, None),
        ("rank load, max / mean", b, n, "imbalance", "{:.5f}", 1, None),
    ]
    for rank in dict.fromkeys((0, big)):
        old, new = reads["before"], reads[str(rank)]
        rows += [
            (f"rank {rank}: read (MB)", old, new, "read_bytes", "{:.4f}", MB, (1, "< 1 MB")),
            (f"rank {rank}: decode (s)", old, new, "decode_s", "{:.3f}", 1, None),
            (f"rank {rank}: plan id (s)", old, new, "id_s", "{:.3g}", 1, None),
            (f"rank {rank}: peak RSS (MiB)", old, new, "peak_rss_mb", "{:,.0f}", 1, None),
        ]
    print(
        f"\n{args.objects:,} objects x {args.ranks:,} ranks (before: {BEFORE}; now: the working tree; "
        f"rank {big} has the largest section; 1 MB = 10^6 bytes)"
    )
    print(f"{'':38}{'before':>14}{'now':>14}{'now/before':>12}   target (issue #16): now")
    for label, before, now, key, fmt, scale, target in rows:
        old, new = before[key] / scale, now[key] / scale
        ratio = f"{new / old:.4f}" if old else "-"
        mark = "" if target is None else f"{target[1]}: " + ("met" if new < target[0] else "NOT met")
        print(f"{label:38}{fmt.format(old):>14}{fmt.format(new):>14}{ratio:>12}   {mark}")
    print("(before, every rank reads and decodes the same whole text, and hashes it again for the id)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--objects", type=int, default=1_000_000)
    parser.add_argument("--ranks", type=int, default=1024)
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "PART"))
    parser.add_argument("--work")
    parser.add_argument("--rank", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="sftc-bench-plan-") as name:
        work = Path(name)
        (work / "old").mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", BEFORE, "sft_cluster"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(work / "old")], input=archive.stdout, check=True)
        plans = {side: run_child(side, "plan", args, work) for side in SIDES}
        big = largest_section(work)
        reads = {"before": run_child("before", "read", args, work)}
        for rank in dict.fromkeys((0, big)):
            reads[str(rank)] = run_child("now", "read", args, work, rank)
        for rank, result in reads.items():
            side = "before" if rank == "before" else "now"
            if result["id"] != plans[side]["id"]:
                raise RuntimeError(
                    f"{side}: a rank reads plan {result['id']}, the driver made {plans[side]['id']}"
                )
    report(args, plans, reads, big)


if __name__ == "__main__":
    main()
