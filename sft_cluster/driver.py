"""What runs on the cluster: prepare the run directory, run Ray Train, report.

The same driver runs in-process for ``sft-cluster run`` (after the local
backend started an embedded Ray) and as the entrypoint of a Ray Job
(``python -m sft_cluster.driver JOB_YAML``) against an existing cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from typing import Any

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from rich.console import Console

from sft_cluster import storage
from sft_cluster.console import ProgressDisplay
from sft_cluster.spec import JobSpec, dump_job_yaml, load_job
from sft_cluster.tracking import RunDir, finalize_run

# Worker processes must keep the driver's working directory (relative paths in
# the job file) and must not echo bytecode through Ray's print patch.
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "TOKENIZERS_PARALLELISM": "false"}


@ray.remote(num_cpus=0)
class ProgressChannel:
    """Collects worker events; the driver drains it. Pushes never block a step."""

    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []

    def push(self, event: dict[str, Any]) -> None:
        self._events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events


class ChannelSink:
    """The worker-side end of ``ProgressChannel``: fire-and-forget calls."""

    def __init__(self, channel: Any):
        self.channel = channel

    def emit(self, event: dict[str, Any]) -> None:
        self.channel.push.remote(event)


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    from sft_cluster.train import run_worker

    run_worker(JobSpec.model_validate(config["job"]), ChannelSink(config["channel"]))


def run_dir_of(job: JobSpec) -> RunDir:
    options = storage.storage_options_for(job.output_uri, job.storage.endpoint_url, job.storage.options)
    return RunDir(job.output_uri, options)


def _follow(channel: Any, display: ProgressDisplay, stop: threading.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            display.handle(ray.get(channel.drain.remote(), timeout=10))
        stop.wait(0.25)
    display.handle(ray.get(channel.drain.remote()))


def describe_failure(exc: Exception) -> tuple[str, str]:
    """(one line for the summary, the full text for the console) of a failed run."""
    failures = getattr(exc, "worker_failures", None) or {}
    if failures:
        rank, failure = min(failures.items())
        text = str(failure).strip()
        lines = [line for line in text.splitlines() if line.strip()]
        return f"rank {rank}: {lines[-1].strip() if lines else type(failure).__name__}", text
    text = str(exc).strip()
    return (text.splitlines()[-1] if text else type(exc).__name__), text


def run_training(job: JobSpec, console: Console, started_at: float | None = None) -> dict[str, Any]:
    """Train ``job`` on the Ray cluster this process is connected to; returns the summary."""
    started_at = started_at or time.time()
    run = run_dir_of(job)
    storage.write_text(run.job_yaml, dump_job_yaml(job), run.options)
    resources = job.resources
    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    channel = ProgressChannel.remote()
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"job": job.model_dump(mode="json"), "channel": channel},
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=job.name,
            storage_path=os.path.join(tempfile.gettempdir(), "sft-cluster", "ray-train"),
            failure_config=FailureConfig(max_failures=job.checkpoint.max_failures),
        ),
    )
    status, error = "failed", None
    stop = threading.Event()
    with ProgressDisplay(console, job.train.max_steps) as display:
        follower = threading.Thread(target=_follow, args=(channel, display, stop), daemon=True)
        follower.start()
        try:
            trainer.fit()
            status = "completed"
        except ray.train.TrainingFailedError as exc:
            error, details = describe_failure(exc)
            console.print(details, style="dim", highlight=False, markup=False)
        finally:
            stop.set()
            follower.join(timeout=15)
    return finalize_run(
        run,
        name=job.name,
        status=status,
        started_at=started_at,
        error=error,
        extra={"strategy": job.strategy.kind},
    )


def main(argv: list[str] | None = None) -> int:
    """Entrypoint on a cluster: ``python -m sft_cluster.driver RESOLVED_JOB_YAML``."""
    parser = argparse.ArgumentParser(prog="sft_cluster.driver")
    parser.add_argument("job")
    args = parser.parse_args(argv)
    job = load_job(args.job)
    ray.init(address="auto", log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})
    summary = run_training(job, Console())
    return 0 if summary["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
