"""Counting for ``train.epochs``: one process counting all the data vs. the ranks each counting their share.

    .venv/bin/python bench/epochs.py --rows 100000 --ranks 2

Synthetic chat records (``bench/data.py``'s: 1-3 turns, about 80 tokens) in 8
local JSONL files; the smoke job's tokenizer and chat template (assistant
masks), max_seq_len 256, best-fit packing: what ``sft_cluster.data.epochs``
counts before a ``train.epochs`` run trains.

- serial: one process counts the rows of a 1-rank plan (every record);
- parallel: ``--ranks`` processes at once, each counting its own rank's share
  of a ``--ranks``-rank plan, as the workers do; the run waits for the slowest
  (one all-gather follows).

Each side runs in fresh subprocesses; the time is that of ``count_rows`` alone
(the workers have the tokenizer loaded already). Counting is one pass over
the records, so its time grows linearly: the 1M figure is extrapolated from
``--rows`` (1M at ~2,000 records/s per core is more than this machine's
budget for a benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARDS = 8
MAX_SEQ_LEN = 256
MICRO_BATCH = 4


def job_dict(data: Path) -> dict:
    return {
        "name": "bench-epochs",
        "model": {"name_or_path": "builtin:tiny-llama", "from_config": True},
        "data": {"sources": [{"uri": f"{data}/part-*.jsonl"}], "max_seq_len": MAX_SEQ_LEN},
        "train": {"epochs": 1, "micro_batch_size": MICRO_BATCH},
    }


def write_data(rows: int, data: Path) -> None:
    from bench.data import synthetic_rows

    data.mkdir()
    handles = [(data / f"part-{i:02d}.jsonl").open("w") for i in range(SHARDS)]
    for index, row in enumerate(synthetic_rows(rows, seed=rows)):
        handles[index % SHARDS].write(json.dumps(row) + "\n")
    for handle in handles:
        handle.close()


def child(data: Path, plan_file: Path, rank: int) -> None:
    from sft_cluster.data import ShardPlan
    from sft_cluster.data.epochs import count_rows
    from sft_cluster.spec import JobSpec
    from sft_cluster.train.model import load_chat

    job = JobSpec.model_validate(job_dict(data))
    encoder = load_chat(job)
    plan = ShardPlan.from_json(plan_file.read_text())
    started = time.perf_counter()
    rows = count_rows(plan, rank, job.data, job.storage, encoder)
    seconds = time.perf_counter() - started
    print("RESULT " + json.dumps({"rank": rank, "rows": rows, "seconds": seconds}), flush=True)


def count(data: Path, work: Path, world_size: int) -> list[dict]:
    """Every rank of a ``world_size``-rank plan counted at once, one process each."""
    from sft_cluster.data import build_plan
    from sft_cluster.spec import JobSpec

    job = JobSpec.model_validate(job_dict(data))
    plan_file = work / f"plan-{world_size}.json"
    plan_file.write_text(build_plan(job.data, job.storage, world_size, seed=42).to_json())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--data", str(data), "--plan", str(plan_file), "--rank"]
    procs = [
        subprocess.Popen(
            [*cmd, str(rank)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for rank in range(world_size)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            raise RuntimeError(f"a counter failed ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
        results.append(json.loads(line.removeprefix("RESULT ")))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000, help="records to count")
    parser.add_argument("--ranks", type=int, default=2, help="ranks counting in parallel")
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plan:
        child(Path(args.data), Path(args.plan), args.rank)
        return
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="sftc-bench-epochs-") as name:
        work = Path(name)
        write_data(args.rows, work / "data")
        serial = count(work / "data", work, 1)[0]
        print(f"serial: {json.dumps(serial)}", flush=True)
        parallel = count(work / "data", work, args.ranks)
        print(f"parallel: {json.dumps(parallel)}", flush=True)
    slowest = max(r["seconds"] for r in parallel)
    scale = 1_000_000 / args.rows
    per_rank = [r["rows"] for r in parallel]
    print(
        f"\n{args.rows:,} records, max_seq_len {MAX_SEQ_LEN}, packed, on {os.cpu_count()} cores "
        f"(load average before: {load:.2f})"
    )
    print(f"{'':34}{'seconds':>10}{'records/s':>14}{'1M records (s)':>17}")
    for label, seconds in (
        ("serial (1 process, 1-rank plan)", serial["seconds"]),
        (f"parallel ({args.ranks} ranks, slowest)", slowest),
    ):
        print(f"{label:34}{seconds:>10.2f}{args.rows / seconds:>14,.0f}{seconds * scale:>17,.0f}")
    print(f"speed-up: {serial['seconds'] / slowest:.2f}x on {args.ranks} ranks")
    print(
        f"rows: serial {serial['rows']:,}; per rank {', '.join(f'{r:,}' for r in per_rank)} "
        f"(sum {sum(per_rank):,}); epochs=1 at micro_batch_size {MICRO_BATCH}: "
        f"{min(per_rank) // MICRO_BATCH:,} steps"
    )


if __name__ == "__main__":
    main()
