"""Run the worker program without Ray: ``torchrun ... -m sft_cluster.train JOB_YAML``.

Rank 0 also writes ``summary.json`` and ``loss.png`` at the end, since no
driver is there to do it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch.distributed as dist

from sft_cluster import exitcodes
from sft_cluster.data import DataError
from sft_cluster.spec import SpecError, load_job
from sft_cluster.tracking import finalize_run, run_dir_of
from sft_cluster.train.runstart import RunComplete, RunRefused
from sft_cluster.train.worker import run_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft_cluster.train")
    parser.add_argument("job", help="resolved job file (YAML)")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        job = load_job(args.job, args.overrides)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return exitcodes.USER_ERROR
    started_at = time.time()
    try:
        report = run_worker(job)
    except (DataError, RunRefused) as exc:  # the user's data, plan or run directory: say what, exit 2
        print(f"error: {exc}", file=sys.stderr)
        return exitcodes.USER_ERROR
    except RunComplete as exc:
        print(exc, file=sys.stderr)
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    status = "preempted" if report["preempted"] else "completed"
    if report["rank"] == 0:
        run = run_dir_of(job)
        finalize_run(
            run,
            name=job.name,
            status=status,
            started_at=started_at,
            extra={"strategy": job.strategy.kind, "launcher": "torchrun"},
        )
    return exitcodes.for_status(status)


if __name__ == "__main__":
    sys.exit(main())
