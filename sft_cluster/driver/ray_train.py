"""The Ray Train executor: the workers are a Ray Train worker group on the connected cluster.

It runs in-process for ``sft-cluster run`` (after the local backend started an embedded
Ray) and under ``python -m sft_cluster.driver`` as a Ray Job or in a Slurm allocation. A
progress channel carries the workers' events to the display and stop requests back.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console

from sft_cluster import storage
from sft_cluster.console import ProgressDisplay
from sft_cluster.data import DataError
from sft_cluster.driver.ray_hangs import watch_hangs
from sft_cluster.driver.resize import resume_plan
from sft_cluster.driver.run import Outcome, Prepared, drive
from sft_cluster.driver.stopfile import StopFile
from sft_cluster.driver.watchdog import Hang, Watchdog, first_attempt
from sft_cluster.spec import JobSpec, WatchdogSpec
from sft_cluster.tracking import RunDir, run_dir_of
from sft_cluster.train.batch import BatchSplit, misfits, with_split
from sft_cluster.train.steps import planned_steps

# Worker processes keep the driver's working directory (relative paths in the job file).
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")


@ray.remote(num_cpus=0)
class ProgressChannel:
    """Worker events up to the driver, a stop request and a save request down to the workers.

    Workers push with fire-and-forget calls, so a step never waits on it. It
    also knows whether the group is training, and its newest commit, for
    ``CommitBeforeResize``.
    """

    def __init__(self, watchdog: WatchdogSpec, first_attempt: int) -> None:
        self.watchdog = Watchdog(watchdog, first_attempt)  # fed every heartbeat, asked by ``watch_hangs``
        self._events: list[dict[str, Any]] = []
        self._stop = False
        self._save = False
        self.training = False  # a group started and has not failed since
        self.committed = -1
        self.stepped_at = time.monotonic()

    def push(self, event: dict[str, Any]) -> None:
        if self.watchdog.observe(event, time.monotonic()):
            return
        self._events.append(event)
        kind = event.get("kind")
        if kind == "start":
            self.training = True
        elif kind == "worker_failed":
            self.training = False
        elif kind == "checkpoint":
            self.committed, self._save = event["step"], False
        elif kind == "step":
            self.stepped_at = time.monotonic()

    def hung(self) -> Hang | None:
        return self.watchdog.check(time.monotonic())

    def request_save(self) -> None:
        self._save = True

    def save_requested(self) -> bool:
        return self._save

    def state(self) -> tuple[bool, int, float]:
        """(training, newest committed step, seconds since the last step)."""
        return self.training, self.committed, time.monotonic() - self.stepped_at

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
    into the same flag a preemption signal sets, and a save request into the
    flag that makes the next step a commit.
    """

    def __init__(self, channel: Any, poll_seconds: float = 2.0):
        from sft_cluster.train import signals

        self.channel = channel

        def poll() -> None:
            while not signals.STOP_REQUESTED.is_set():
                with contextlib.suppress(Exception):
                    if ray.get(channel.stop_requested.remote(), timeout=30):
                        signals.STOP_REQUESTED.set()
                    if ray.get(channel.save_requested.remote(), timeout=30):
                        signals.SAVE_REQUESTED.set()
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


class CommitBeforeResize(ControllerCallback):
    """Runs in Ray Train's controller: before an elastic group that is training is resized (it
    grows by restarting), the workers commit the step they are at, so the restart loses none.

    A private hook of Ray 2.60 (``before_controller_execute_resize_decision``): RunConfig
    callbacks that are not UserCallbacks join the controller's own. A group that failed, or
    none yet, or one that stopped stepping, has nothing to commit: the resize goes ahead.
    """

    def __init__(self, channel: Any, timeout_s: float = 300.0, idle_s: float = 60.0):
        self.channel = channel
        self.timeout_s, self.idle_s = timeout_s, idle_s

    def before_controller_execute_resize_decision(self, resize_decision: Any) -> None:
        training, committed, idle = ray.get(self.channel.state.remote())
        if not training or idle > self.idle_s:
            return
        self.channel.push.remote(
            {
                "kind": "notice",
                "message": f"the worker group is resized to {resize_decision.num_workers}: committing first",
            }
        )
        self.channel.request_save.remote()
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            training, newest, idle = ray.get(self.channel.state.remote())
            if newest > committed or not training or idle > self.idle_s:
                return
            time.sleep(0.5)


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    from ray.train.torch import get_device

    from sft_cluster.train import run_worker
    from sft_cluster.train.staging import NODE_ENV
    from sft_cluster.train.strategy import DEVICE_ENV

    # What the worker cannot know without asking Ray: its node, and (on GPUs) its device.
    os.environ[NODE_ENV] = ray.get_runtime_context().get_node_id()
    device = get_device()
    if device.type == "cuda":
        os.environ[DEVICE_ENV] = str(device.index)
    job = JobSpec.model_validate(config["job"])
    sink = ChannelSink(config["channel"])
    if job.resources.elastic:
        job = _sized_for_this_group(job, sink)
    run_worker(job, sink, verify_fast=config["verify_fast"])


def _sized_for_this_group(job: JobSpec, sink: ChannelSink) -> JobSpec:
    """An elastic run's group may start at any size in the range, inside ``fit()`` where no
    driver code runs: rank 0 re-plans for this size (``resize``), every rank takes its split."""
    from sft_cluster.train import collectives

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    outcome: tuple[str, int, int] | None = None
    if rank == 0:
        try:
            notify = lambda message: sink.emit({"kind": "notice", "message": message})  # noqa: E731
            split = resume_plan(job, run_dir_of(job), world_size, notify)[1]
            outcome = ("split", split.micro, split.accum)
        except DataError as exc:  # every rank must hear of it, or the others wait forever
            outcome = (str(exc), 0, 0)
    said, micro, accum = collectives.broadcast_from_rank0(outcome)
    if said != "split":
        raise DataError(said)
    return with_split(job, BatchSplit(micro, accum, world_size))


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
    uri = run.ray_train
    if storage.is_local(uri):
        return {"storage_path": str(storage.local_path(uri))}
    import pyarrow.fs

    fs, path = storage.filesystem(uri, run.options)
    return {"storage_path": path, "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))}


class RayTrainExecutor:
    """A Ray Train worker group of ``resources.num_workers`` on the cluster this process is connected to."""

    name = "ray"

    def __init__(self, verify_fast: bool = False):
        self.verify_fast = verify_fast

    @staticmethod
    def _per_worker(job: JobSpec) -> dict[str, float]:
        per_worker = {"CPU": job.resources.cpus_per_worker}
        if job.resources.gpus_per_worker > 0:
            per_worker["GPU"] = job.resources.gpus_per_worker
        return per_worker

    def world(self, job: JobSpec) -> tuple[int, int]:
        """Raises DataError when an elastic range holds a size the global batch does not split over."""
        resources = job.resources
        bad = (
            misfits(job, range(resources.min_workers, resources.max_workers + 1)) if resources.elastic else []
        )
        if bad:
            raise DataError(
                f"train.global_batch_size = {job.train.global_batch_size} does not split over "
                f"{', '.join(map(str, bad))} workers, which resources.num_workers = "
                f"{{min: {resources.min_workers}, max: {resources.max_workers}}} allows on Ray "
                "(use a multiple of every size in the range)"
            )
        return resources.max_workers, worker_nodes(self._per_worker(job))

    def execute(self, prepared: Prepared, console: Console) -> Outcome:
        job, run = prepared.job, prepared.run
        use_gpu = job.resources.gpus_per_worker > 0
        # On the driver's node: a 0-CPU actor may land on any node, and one that is lost would take
        # the progress display and stop requests with it.
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        channel = ProgressChannel.options(scheduling_strategy=here).remote(job.watchdog, first_attempt(run))
        trainer = TorchTrainer(
            _train_loop_per_worker,
            train_loop_config={
                "job": job.model_dump(mode="json"),
                "channel": channel,
                "verify_fast": self.verify_fast,
            },
            scaling_config=ScalingConfig(
                num_workers=(
                    (job.resources.min_workers, job.resources.max_workers)
                    if job.resources.elastic
                    else job.resources.num_workers
                ),
                elastic_resize_monitor_interval_s=job.resources.resize_interval_s,
                use_gpu=use_gpu,
                resources_per_worker=self._per_worker(job),
            ),
            torch_config=TorchConfig(
                backend="nccl" if use_gpu else "gloo", timeout_s=int(job.watchdog.collective_timeout_s)
            ),
            run_config=RunConfig(
                # Unique per attempt: Ray Train would treat a reused name as its own resume.
                name=f"{job.name}-{uuid.uuid4().hex[:8]}",
                **ray_train_storage(run),
                failure_config=FailureConfig(max_failures=job.checkpoint.max_failures),
                callbacks=[RestartNotice(channel), CommitBeforeResize(channel)],
            ),
        )
        outcome = Outcome("failed")
        stop = threading.Event()
        # train.epochs: the workers count the steps; the display takes them from their step events.
        with ProgressDisplay(console, planned_steps(job)) as display, _stop_requests_to(channel, job):
            follower = threading.Thread(
                target=_follow, args=(channel, display, stop, prepared.stop_file), daemon=True
            )
            follower.start()
            threading.Thread(target=watch_hangs, args=(channel, run, stop), daemon=True).start()
            try:
                trainer.fit()
                preempted = any(r.get("preempted") for r in run.worker_reports())
                outcome = Outcome("preempted" if preempted else "completed")
            except ray.train.TrainingFailedError as exc:
                error, details = describe_failure(exc)
                console.print(details, style="dim", highlight=False, markup=False)
                outcome = Outcome("failed", error)
            finally:
                stop.set()
                follower.join(timeout=15)
        return outcome


def run_training(
    job: JobSpec, console: Console, started_at: float | None = None, verify_fast: bool = False
) -> dict[str, Any]:
    """Train ``job`` on the Ray cluster this process is connected to; returns the summary."""
    return drive(job, RayTrainExecutor(verify_fast), console, started_at)
