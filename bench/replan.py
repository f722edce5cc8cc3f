"""What a resume on another world size costs in data work, beside a resume on the same one.

    .venv/bin/python bench/replan.py [--rows 20000] [--objects 10000] [--ranks 64]

Two parts, one run:

- real data: synthetic chat records (``bench/data.py``'s) in 8 local JSONL
  files, the smoke job's tokenizer and template, max_seq_len 256, packing.
  2 ranks train 40 rows each (the DataLoader 8 rows ahead), then the resume's
  data work is timed per rank until its first row: on the same 2 ranks (the
  cursor re-reads and re-packs one window) and on 4 (``replan`` of the two
  cursors, then each new rank's first window). The figure is the slowest
  rank's, as the step waits for it.
- a big listing: ``--objects`` objects of 50 MB, planned for ``--ranks``
  ranks, and cursors of every rank with a window of 400 taken records;
  ``replan`` onto twice and half the ranks, beside ``make_plan`` itself.

The target (issue #15): a resume on another world size costs at most 1 s more
data work than a same-size resume.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.epochs import job_dict, write_data  # noqa: E402
from sft_cluster.data import build_plan, make_plan  # noqa: E402
from sft_cluster.data.records import ObjectInfo  # noqa: E402
from sft_cluster.data.replan import replan  # noqa: E402
from sft_cluster.data.stream import PackedRowStream  # noqa: E402
from sft_cluster.spec import JobSpec  # noqa: E402
from sft_cluster.train.model import load_chat  # noqa: E402

TRAINED, AHEAD = 40, 8


def first_row_seconds(plan, rank, job, encoder, state) -> float:
    started = time.perf_counter()
    next(PackedRowStream(plan, rank, job.data, job.storage, encoder, state))
    return time.perf_counter() - started


def real_data(rows: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_data(rows, data)
        job = JobSpec.model_validate({**job_dict(data), "output_uri": str(Path(tmp) / "run")})
        encoder = load_chat(job)
        plan = build_plan(job.data, job.storage, 2, job.train.seed)
        cursors = []
        for rank in range(2):
            stream = PackedRowStream(plan, rank, job.data, job.storage, encoder)
            for _ in range(TRAINED + AHEAD):
                next(stream)
            cursors.append(json.loads(json.dumps(stream.state_after(TRAINED))))
        same = max(first_row_seconds(plan, r, job, encoder, cursors[r]) for r in range(2))
        started = time.perf_counter()
        new = replan(plan, cursors, job.data, 4, 10)
        planning = time.perf_counter() - started
        other = planning + max(first_row_seconds(new, r, job, encoder, None) for r in range(4))
        return {"same_size_s": same, "other_size_s": other, "replan_s": planning}


def big_listing(objects: int, ranks: int) -> dict[str, float]:
    rng = random.Random(0)
    listing = [
        [ObjectInfo(f"s3://bucket/data/part-{i:07d}.jsonl.zst", 50 << 20, "v1") for i in range(objects)]
    ]
    data = JobSpec.model_validate(job_dict(Path("/d"))).data
    started = time.perf_counter()
    plan = make_plan(data, listing, ranks, 0)
    planned = time.perf_counter() - started
    cursors = []
    for rank in range(ranks):
        units = plan.sources[0].ranks[rank]
        at = rng.randrange(len(units))
        position = {"epoch": 0, "unit": at, "record": rng.randrange(1000), "epoch_samples": 1}
        order = plan.units(0, rank, 0)
        taken = [[0, 0, order[at].unit.key, rng.randrange(1000, 100_000)] for _ in range(400)]
        window = {"draws": 0, "positions": [position], "counters": [{}], "first_bad": None}
        cursors.append(
            {"plan": plan.id, "rank": rank, "rows": 1, "skip": 1, "window": window, "taken": taken}
        )
    figures = {"make_plan_s": planned}
    for size in (ranks * 2, ranks // 2):
        started = time.perf_counter()
        replan(plan, cursors, data, size, 100)
        figures[f"replan_to_{size}_s"] = time.perf_counter() - started
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--ranks", type=int, default=64)
    args = parser.parse_args()
    real = real_data(args.rows)
    print(f"real data, {args.rows:,} records, 2 -> 4 ranks after {TRAINED} rows each:")
    print(f"  same-size resume, slowest rank to its first row:  {real['same_size_s']:.3f} s")
    print(f"  2 -> 4 resume (replan {real['replan_s']:.4f} s + first row):  {real['other_size_s']:.3f} s")
    print(f"  extra data work: {real['other_size_s'] - real['same_size_s']:+.3f} s (target <= 1 s)")
    big = big_listing(args.objects, args.ranks)
    print(f"listing of {args.objects:,} objects, {args.ranks} ranks:")
    for name, seconds in big.items():
        print(f"  {name}: {seconds:.3f} s")
    print(json.dumps({"real": real, "big": big, **vars(args)}))


if __name__ == "__main__":
    main()
