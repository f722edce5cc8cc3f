"""The worker program under torchrun: ``python -m sft_cluster.train RESOLVED_JOB_YAML``.

Started by the driver's torchrun executor (``sft_cluster.driver.torchrun``), which prepared the
run before and finishes it after; this only trains one rank and exits 0, 75 (stopped for
preemption after a commit) or 2 (a mistake in the job's data, explained on stderr).
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch.distributed as dist

from sft_cluster import exitcodes
from sft_cluster.data import DataError
from sft_cluster.spec import JobSpec, SpecError, load_job
from sft_cluster.train.heartbeat import node_sink
from sft_cluster.train.progress import LogSink
from sft_cluster.train.worker import run_worker


def work(job: JobSpec) -> int:
    """Train this rank of ``job``; the process exit code. Progress goes to the log (``LogSink``),
    heartbeats to the executor's watcher (``node_sink``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        report = run_worker(job, node_sink(LogSink()))
    except DataError as exc:  # the user's data or plan: say what, exit 2
        print(f"error: {exc}", file=sys.stderr)
        return exitcodes.USER_ERROR
    return exitcodes.PREEMPTED if report["preempted"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft_cluster.train")
    parser.add_argument("job", help="the job file the driver resolved")
    args = parser.parse_args(argv)
    try:
        job = load_job(args.job)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return exitcodes.USER_ERROR
    try:
        return work(job)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
