"""``python -m sft_cluster.driver JOB_YAML [KEY=VALUE ...]``: the driver on a cluster.

``--executor ray`` (default): against the Ray cluster at ``RAY_ADDRESS`` / ``address="auto"``
(a Ray Job passes the job in a variable, ``--job-env``). ``--executor torchrun``: on every node
of an allocation, torchrun's agent in this process (see ``driver.torchrun``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

from rich.console import Console

from sft_cluster import exitcodes
from sft_cluster.spec import JobSpec, SpecError, load_job


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sft_cluster.driver")
    parser.add_argument("job", nargs="?", help="the resolved job file")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides")
    parser.add_argument("--job-env", metavar="VAR", help="read the job YAML from this variable (Ray Jobs)")
    parser.add_argument("--fast", action="store_true", help="verify checkpoint sizes only")
    parser.add_argument("--executor", choices=("ray", "torchrun"), default="ray")
    torchrun = parser.add_argument_group("torchrun executor")
    torchrun.add_argument("--nnodes", type=int, default=1)
    torchrun.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=1)
    # The only one: the first node's word to the others (driver.torchrun.NodeWord) shares its store.
    torchrun.add_argument("--rdzv-backend", choices=("c10d",), default="c10d")
    torchrun.add_argument("--rdzv-endpoint", help="HOST:PORT of the first node (default: standalone)")
    torchrun.add_argument("--rdzv-id", default="sft-cluster")
    torchrun.add_argument("--ignore-signal", metavar="SIG", help="the preemption signal, left to the workers")
    torchrun.add_argument(
        "--worker-module",
        default="sft_cluster.train",
        help="the worker program, run as -m MODULE JOB_YAML (the GPU check wraps the default one)",
    )
    args = parser.parse_args(argv)
    if not (args.job or args.job_env):
        parser.error("give JOB_YAML or --job-env VAR")
    return args


def _load(args: argparse.Namespace) -> JobSpec:
    if not args.job_env:
        return load_job(args.job, args.overrides)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        handle.write(os.environ.get(args.job_env, ""))
    try:
        return load_job(handle.name, args.overrides)
    finally:
        os.unlink(handle.name)


def _on_ray(job: JobSpec, fast: bool) -> int:
    import ray

    from sft_cluster.driver.environment import ray_worker_runtime_env
    from sft_cluster.driver.ray_train import run_training

    ray.init(address="auto", log_to_driver=False, runtime_env=ray_worker_runtime_env(job))
    return exitcodes.for_status(run_training(job, Console(), verify_fast=fast)["status"])


def _with_torchrun(job: JobSpec, args: argparse.Namespace) -> int:
    from sft_cluster.driver.resize import workers_job
    from sft_cluster.driver.run import drive
    from sft_cluster.driver.torchrun import NODE_RANK_ENV, NodeWord, TorchrunExecutor, ignore_signal, job_file
    from sft_cluster.spec import dump_job_yaml

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.ignore_signal:
        ignore_signal(args.ignore_signal)
    node_rank = int(os.environ.get(NODE_RANK_ENV, "0"))
    first = node_rank == 0
    several = args.nnodes > 1 and args.rdzv_endpoint
    word = NodeWord(args.rdzv_endpoint, args.nnodes, first) if several else None
    with job_file(job) as path:
        executor = TorchrunExecutor(
            path,
            args.nnodes,
            args.nproc_per_node,
            args.rdzv_endpoint,
            args.rdzv_id,
            word=word,
            worker_module=args.worker_module,
            rdzv_backend=args.rdzv_backend,
            node_rank=node_rank,
        )
        if not first:  # the first node prepares and finishes; this one trains when told to
            code = word.take() if word else 0
            if code:
                told = f"sft-cluster: the first node's driver did not start the run (exit {code})"
                print(told, file=sys.stderr)
                return code
            path.write_text(dump_job_yaml(workers_job(job, args.nnodes * args.nproc_per_node)))
            return executor.start_agent(job)
        summary = drive(job, executor, Console(stderr=True))
        code = exitcodes.for_status(summary["status"]) if executor.exit_code is None else executor.exit_code
        if word is not None and executor.exit_code is None:  # refused, or complete: no agent starts
            word.give(code)
        return code


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    try:
        job = _load(args)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return exitcodes.USER_ERROR
    if args.executor == "torchrun":
        return _with_torchrun(job, args)
    return _on_ray(job, args.fast)


if __name__ == "__main__":
    sys.exit(main())
