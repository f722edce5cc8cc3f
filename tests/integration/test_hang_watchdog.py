"""The hang watchdog on real runs: one of two workers is SIGSTOPped mid-run; every rank's stacks are
written, the attempt ends, and the run resumes from its newest commit to the weights of an
uninterrupted run (the reference run of the fault-tolerance tests). Under Ray, Ray Train's restart
resumes it; under torchrun the driver exits 75 and a restart (a requeue) resumes it, on one node
and on two (two drivers on this machine, the run in a real S3 bucket)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from sft_cluster.driver.torchrun import NODE_RANK_ENV
from sft_cluster.train.staging import NODE_NAME_ENV
from tests.conftest import REFERENCE_JOB, REPO, TORCHRUN_DRIVER, max_weight_diff, run_torchrun
from tests.conftest import REFERENCE_STEPS as STEPS
from tests.fixtures.s3 import free_port, s3_server  # noqa: F401 - fixture
from tests.integration.test_fault_tolerance import _committed, _losses, _records, _start, _until

# A limit of seconds: 5 x the median step time, at least 5 s (a loaded 2-core machine must not
# look hung); evaluations and saves get 30 s. Steps 14-19 have neither.
WATCHDOG = [
    "watchdog.step_timeout_s=30",
    "watchdog.min_limit_s=5",
    "watchdog.median_multiple=5",
    "watchdog.warmup_steps=5",
]


def _stop_a_worker(proc: subprocess.Popen, out: Path, command: str) -> tuple[psutil.Process, float]:
    """SIGSTOP the second of the run's workers (``command`` in their command lines) at step 14 or
    later, after a commit; the process and when."""

    def last_step() -> int:
        records = _records(out, "metrics.jsonl")
        return records[-1]["step"] if records else 0

    _until(lambda: _committed(out) and last_step() >= 14, proc, "step 14 after a commit")
    workers = [
        p for p in psutil.Process(proc.pid).children(recursive=True) if command in " ".join(p.cmdline())
    ]
    workers[1].send_signal(signal.SIGSTOP)
    return workers[1], time.time()


def _dumped_and_ended(out: Path, stopped: psutil.Process, output: str, records: list[str]) -> dict:
    """Every rank's stacks in hangs/attempt-1 beside the nodes' ``records`` (torchrun's), the
    ``hang`` event, the stopped worker gone."""
    hang = next(e for e in _records(out, "events.jsonl") if e["event"] == "hang")
    assert hang["attempt"] == 1 and hang["step"] >= 14
    assert 5 <= hang["limit_s"] < 30 and hang["seconds"] <= hang["limit_s"] + 2  # the median's limit
    assert hang["stacks"] == str(out / "hangs" / "attempt-1")
    files = {p.name: p.read_text() for p in (out / "hangs" / "attempt-1").iterdir()}
    assert sorted(files) == [*records, "rank-0.txt", "rank-1.txt"]
    stacks = {name: text for name, text in files.items() if name.startswith("rank-")}
    assert all("_inner_training_loop" in text for text in stacks.values()), stacks
    assert any(text.startswith(f"pid {stopped.pid} ") and "(stopped)" in text for text in stacks.values())
    assert "hung at step" in output and "ending the attempt" in output
    assert not stopped.is_running() or stopped.status() == psutil.STATUS_ZOMBIE
    return hang


def _as_uninterrupted(out: Path, reference_run: Path) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from"][-1] >= 10
    assert sorted(_losses(out)) == list(range(1, STEPS + 1))
    assert _losses(out) == _losses(reference_run)
    assert max_weight_diff(out, reference_run) <= 1e-6


def _say(executor: str, hang: dict, stopped_at: float) -> None:
    delay = hang["time"] - stopped_at
    print(f"\n{executor}: hang declared {delay:.1f} s after the SIGSTOP (limit {hang['limit_s']} s)")


def test_ray_a_stopped_worker_is_dumped_ended_and_the_run_resumes_to_the_same_weights(
    tmp_path, isolated_env, reference_run
):
    out = tmp_path / "hung"
    proc = _start(out, isolated_env, *WATCHDOG)
    stopped, stopped_at = _stop_a_worker(proc, out, "RayTrainWorker")
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    hang = _dumped_and_ended(out, stopped, output, records=[])
    assert "resumed from step" in output
    _as_uninterrupted(out, reference_run)
    _say("Ray", hang, stopped_at)


# Opt-in (-m slow, 80 s in CI): the two-node test below runs the same torchrun path (a watcher per
# node, the first node's driver recording the hang, exit 75, a restart to the reference weights).
@pytest.mark.slow
def test_torchrun_a_stopped_worker_is_dumped_ended_and_a_restart_resumes_to_the_same_weights(
    tmp_path, isolated_env, reference_run
):
    out = tmp_path / "hung"
    proc = subprocess.Popen(
        [*TORCHRUN_DRIVER, *REFERENCE_JOB, f"output_uri={out}", *WATCHDOG, "--nproc-per-node=2"],
        cwd=REPO,
        env={**isolated_env, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stopped, stopped_at = _stop_a_worker(proc, out, "sft_cluster.train")
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 75, output[-4000:]  # "requeue me"
    hang = _dumped_and_ended(out, stopped, output, records=["node-0.json"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "hung at step" in summary["error"]

    resumed = run_torchrun(out / "job.yaml", isolated_env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    _as_uninterrupted(out, reference_run)
    _say("torchrun", hang, stopped_at)


def test_torchrun_on_two_nodes_each_nodes_hang_is_recorded_once_and_a_restart_resumes(
    tmp_path,
    isolated_env,
    reference_run,
    s3_server,  # noqa: F811
):
    """Two drivers as the Slurm template starts them on two nodes (one process each, c10d
    rendezvous), the run in a bucket; the second node's worker is stopped. Both nodes' watchers fire
    at about the same moment: each writes its own record, the first node's driver alone appends
    them to ``events.jsonl`` (a store rewrites it whole: two writers would lose a line), and it
    ends the run as hung even where its own worker died first of the lost peer."""
    bucket = s3_server.make_bucket()
    prefix = "runs/hung"
    job = [*REFERENCE_JOB, f"output_uri=s3://{bucket}/{prefix}", f"storage.endpoint_url={s3_server.endpoint}"]
    rendezvous = [
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--rdzv-id=two-nodes",
    ]

    def start_both(attempt: str) -> list[subprocess.Popen]:
        return [
            subprocess.Popen(
                [*TORCHRUN_DRIVER, *job, *WATCHDOG, *rendezvous],
                cwd=REPO,
                env={**isolated_env, **s3_server.env(), "OMP_NUM_THREADS": "1"}
                | {NODE_RANK_ENV: str(node), NODE_NAME_ENV: f"node-{node}"},
                stdout=(tmp_path / f"{attempt}-node-{node}.log").open("w"),
                stderr=subprocess.STDOUT,
            )
            for node in (0, 1)
        ]

    def log(attempt: str, node: int) -> str:
        return (tmp_path / f"{attempt}-node-{node}.log").read_text()

    def get(key: str) -> bytes:
        return s3_server.client().get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()

    drivers = start_both("hung")
    commit = f"{prefix}/checkpoints/step-00000010/COMMITTED"
    _until(lambda: commit in s3_server.keys(bucket, prefix), drivers[0], "step 10", poll=0.5)
    processes = psutil.Process(drivers[1].pid).children(recursive=True)
    (worker,) = [p for p in processes if "sft_cluster.train" in " ".join(p.cmdline())]
    worker.send_signal(signal.SIGSTOP)
    codes = [driver.wait(timeout=600) for driver in drivers]
    assert codes == [75, 75], log("hung", 0)[-3000:] + log("hung", 1)[-3000:]  # both "requeue me"
    summary = json.loads(get("summary.json"))
    assert summary["status"] == "failed" and "hung at step" in summary["error"]
    stacks = get("hangs/attempt-1/rank-1.txt").decode()
    assert stacks.startswith(f"pid {worker.pid} ") and "(stopped)" in stacks
    assert "_inner_training_loop" in stacks

    restarted = start_both("restarted")  # as a requeue does: the same command on both nodes
    codes = [driver.wait(timeout=600) for driver in restarted]
    assert codes == [0, 0], log("restarted", 0)[-3000:] + log("restarted", 1)[-3000:]
    records = {key.rsplit("/", 1)[1] for key in s3_server.keys(bucket, f"{prefix}/hangs/attempt-1/node-")}
    hangs = [event for event in map(json.loads, get("events.jsonl").splitlines()) if event["event"] == "hang"]
    # Every node's record once in the events, the stopped worker's node's among them.
    assert sorted(f"node-{event['node_rank']}.json" for event in hangs) == sorted(records), hangs
    assert "node-1.json" in records
    stopped = next(event for event in hangs if event["node_rank"] == 1)
    assert (stopped["rank"], stopped["node"], stopped["attempt"]) == (1, "node-1", 1)

    mirror = tmp_path / "mirror"
    (mirror / "final").mkdir(parents=True)
    for name in ("summary.json", "metrics.jsonl", "final/model.safetensors"):
        (mirror / name).write_bytes(get(name))
    _as_uninterrupted(mirror, reference_run)
