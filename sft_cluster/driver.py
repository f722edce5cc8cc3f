"""What runs on the cluster: prepare the run directory, run Ray Train, report.

The same driver runs in-process for ``sft-cluster run`` (after the local
backend started an embedded Ray) and as the entrypoint of a Ray Job
(``python -m sft_cluster.driver JOB_YAML``) against an existing cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console

from sft_cluster import exitcodes, storage
from sft_cluster.console import ProgressDisplay
from sft_cluster.data import DataError
from sft_cluster.spec import JobSpec, load_job
from sft_cluster.tracking import RunDir, finalize_run, run_dir_of
from sft_cluster.train.environment import ray_worker_runtime_env
from sft_cluster.train.runstart import RunComplete, RunRefused, claim_run
from sft_cluster.train.steps import planned_steps

# Worker processes keep the driver's working directory (relative paths in the job file).
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")


@ray.remote(num_cpus=0)
class ProgressChannel:
    """Worker events up to the driver, a stop request down to the workers.

    Workers push with fire-and-forget calls, so a step never waits on it.
    """

    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []
        self._stop = False

    def push(self, event: dict[str, Any]) -> None:
        self._events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events

    def request_stop(self) -> None:
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop


class ChannelSink:
    """The worker-side end of ``ProgressChannel``.

    A daemon thread polls for a stop request every few seconds and turns it
    into the same flag a preemption signal sets.
    """

    def __init__(self, channel: Any, poll_seconds: float = 2.0):
        from sft_cluster.train import signals

        self.channel = channel

        def poll() -> None:
            while not signals.STOP_REQUESTED.is_set():
                with contextlib.suppress(Exception):
                    if ray.get(channel.stop_requested.remote(), timeout=30):
                        signals.STOP_REQUESTED.set()
                time.sleep(poll_seconds)

        threading.Thread(target=poll, daemon=True).start()

    def emit(self, event: dict[str, Any]) -> None:
        self.channel.push.remote(event)


class RestartNotice(UserCallback):
    """Runs in Ray Train's controller: tells the driver which rank failed."""

    def __init__(self, channel: Any):
        self.channel = channel

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank, exc in sorted(worker_exceptions.items()):
            lines = [line for line in str(exc).splitlines() if line.strip()]
            reason = lines[-1].strip() if lines else type(exc).__name__
            self.channel.push.remote({"kind": "worker_failed", "rank": rank, "reason": reason[:200]})


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    from sft_cluster.train import run_worker
    from sft_cluster.train.staging import NODE_ENV

    os.environ[NODE_ENV] = ray.get_runtime_context().get_node_id()
    job = JobSpec.model_validate(config["job"])
    run_worker(job, ChannelSink(config["channel"]), verify_fast=config["verify_fast"], make_plan=False)


@contextlib.contextmanager
def _stop_requests_to(channel: Any, job: JobSpec) -> Iterator[None]:
    """While training, the job's preemption signals to the driver become a stop request.

    The workers then checkpoint at the next step and end; the driver exits
    with ``exitcodes.PREEMPTED``. Outside the main thread nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = job.checkpoint.preemption_signals
    previous = {name: signal.getsignal(getattr(signal, name)) for name in names}

    def handler(signum: int, frame: object) -> None:
        channel.request_stop.remote()

    for name in names:
        signal.signal(getattr(signal, name), handler)
    try:
        yield
    finally:
        for name, old in previous.items():
            signal.signal(getattr(signal, name), old)


class StopFile:
    """``sft-cluster stop`` writes ``control/stop`` naming the run; the driver polls it.

    A request that names another run (left from an earlier stop of this directory) is
    removed at start and never acted on.
    """

    POLL_SECONDS = 2.0

    def __init__(self, run: RunDir, run_id: str):
        self.run = run
        self.run_id = run_id
        self._next_poll = 0.0

    def _named_run(self) -> str | None:
        try:
            return json.loads(storage.read_text(self.run.stop_request, self.run.options)).get("run_id")
        except (FileNotFoundError, ValueError, AttributeError):
            return None

    def clear(self, only_stale: bool = False) -> None:
        if storage.exists(self.run.stop_request, self.run.options) and not (
            only_stale and self._named_run() == self.run_id
        ):
            fs, path = storage.filesystem(self.run.stop_request, self.run.options)
            fs.rm(path)

    def requested(self) -> bool:
        """Whether this run was asked to stop (reads storage at most every POLL_SECONDS)."""
        if time.monotonic() < self._next_poll:
            return False
        self._next_poll = time.monotonic() + self.POLL_SECONDS
        with contextlib.suppress(OSError):
            return self._named_run() == self.run_id
        return False


def _follow(channel: Any, display: ProgressDisplay, stop: threading.Event, stop_file: StopFile) -> None:
    asked = False
    while not stop.is_set():
        with contextlib.suppress(ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            display.handle(ray.get(channel.drain.remote(), timeout=10))
        if not asked and stop_file.requested():
            asked = True
            display.handle(
                [{"kind": "notice", "message": "stop requested (sft-cluster stop): checkpointing"}]
            )
            channel.request_stop.remote()
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


def worker_nodes(per_worker: dict[str, float]) -> int:
    """How many alive nodes of the cluster could run one of this job's workers."""
    return sum(
        1
        for node in ray.nodes()
        if node["Alive"]
        and all(node["Resources"].get(name, 0) >= amount for name, amount in per_worker.items())
    )


def ray_train_storage(run: RunDir) -> dict[str, Any]:
    """Ray Train's own ``storage_path`` (and filesystem): under the run directory, so every node
    reaches it as it reaches the run (raylets of one machine share /tmp; a cluster's nodes do not)."""
    uri = storage.join(run.uri, "ray-train")
    if storage.is_local(uri):
        return {"storage_path": str(storage.local_path(uri))}
    import pyarrow.fs

    fs, path = storage.filesystem(uri, run.options)
    return {"storage_path": path, "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))}


def run_training(
    job: JobSpec, console: Console, started_at: float | None = None, verify_fast: bool = False
) -> dict[str, Any]:
    """Train ``job`` on the Ray cluster this process is connected to; returns the summary."""
    started_at = started_at or time.time()
    run = run_dir_of(job)
    resources = job.resources
    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker > 0:
        per_worker["GPU"] = resources.gpus_per_worker
    try:
        start = claim_run(job, resources.num_workers, console.print, nodes=worker_nodes(per_worker))
    except (DataError, RunRefused) as exc:
        # Refused before anything was written: the run directory is as it was.
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return {"name": job.name, "status": "rejected", "error": str(exc), "output_uri": run.uri}
    except RunComplete as exc:
        console.print(str(exc), highlight=False)
        return (
            run.read_json(run.summary)
            if storage.exists(run.summary, run.options)
            else {"name": job.name, "status": "completed", "output_uri": run.uri}
        )
    # Reports of an earlier attempt must not speak for this one.
    fs, workers = storage.filesystem(storage.join(run.uri, "workers"), run.options)
    if fs.exists(workers):
        fs.rm(workers, recursive=True)
    stop_file = StopFile(run, start.run_id)
    stop_file.clear(only_stale=True)
    use_gpu = resources.gpus_per_worker > 0
    # On the driver's node: a 0-CPU actor may land on any node, and one that is lost would take
    # the progress display and stop requests with it.
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    channel = ProgressChannel.options(scheduling_strategy=here).remote()
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={
            "job": job.model_dump(mode="json"),
            "channel": channel,
            "verify_fast": verify_fast,
        },
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            # Unique per attempt: Ray Train would treat a reused name as its own resume.
            name=f"{job.name}-{uuid.uuid4().hex[:8]}",
            **ray_train_storage(run),
            failure_config=FailureConfig(max_failures=job.checkpoint.max_failures),
            callbacks=[RestartNotice(channel)],
        ),
    )
    status, error = "failed", None
    stop = threading.Event()
    # train.epochs: the workers count the steps; the display takes them from their step events.
    with ProgressDisplay(console, planned_steps(job)) as display, _stop_requests_to(channel, job):
        follower = threading.Thread(target=_follow, args=(channel, display, stop, stop_file), daemon=True)
        follower.start()
        try:
            trainer.fit()
            preempted = any(r.get("preempted") for r in run.worker_reports())
            status = "preempted" if preempted else "completed"
        except ray.train.TrainingFailedError as exc:
            error, details = describe_failure(exc)
            console.print(details, style="dim", highlight=False, markup=False)
        finally:
            stop.set()
            follower.join(timeout=15)
    stop_file.clear()  # honoured (or too late): a later resume must not stop at once
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
    parser.add_argument("job", nargs="?", help="the resolved job file")
    parser.add_argument("--job-env", metavar="VAR", help="read the job YAML from this variable (Ray Jobs)")
    parser.add_argument("--fast", action="store_true", help="verify checkpoint sizes only")
    args = parser.parse_args(argv)
    if args.job_env:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
            handle.write(os.environ.get(args.job_env, ""))
        args.job = handle.name
    if not args.job:
        parser.error("give JOB_YAML or --job-env VAR")
    try:
        job = load_job(args.job)
    finally:
        if args.job_env:
            os.unlink(args.job)
    ray.init(address="auto", log_to_driver=False, runtime_env=ray_worker_runtime_env(job))
    summary = run_training(job, Console(), verify_fast=args.fast)
    return exitcodes.for_status(summary["status"])


if __name__ == "__main__":
    sys.exit(main())
