"""The hang watchdog on real runs: one of two workers is SIGSTOPped mid-run; every rank's stacks are
written, the attempt ends, and the run resumes from its newest commit to the weights of an
uninterrupted run (the reference run of the fault-tolerance tests). Under Ray, Ray Train's restart
resumes it; under torchrun the driver exits 75 and a restart (a requeue) resumes it."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil

from tests.conftest import REFERENCE_JOB, REPO, TORCHRUN_DRIVER, max_weight_diff, run_torchrun
from tests.conftest import REFERENCE_STEPS as STEPS
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


def _dumped_and_ended(out: Path, stopped: psutil.Process, output: str) -> dict:
    """Every rank's stacks in hangs/attempt-1, the ``hang`` event, the stopped worker gone."""
    hang = next(e for e in _records(out, "events.jsonl") if e["event"] == "hang")
    assert hang["attempt"] == 1 and hang["step"] >= 14
    assert 5 <= hang["limit_s"] < 30 and hang["seconds"] <= hang["limit_s"] + 2  # the median's limit
    assert hang["stacks"] == str(out / "hangs" / "attempt-1")
    stacks = {p.name: p.read_text() for p in (out / "hangs" / "attempt-1").iterdir()}
    assert sorted(stacks) == ["rank-0.txt", "rank-1.txt"]
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
    hang = _dumped_and_ended(out, stopped, output)
    assert "resumed from step" in output
    _as_uninterrupted(out, reference_run)
    _say("Ray", hang, stopped_at)


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
    hang = _dumped_and_ended(out, stopped, output)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "hung at step" in summary["error"]

    resumed = run_torchrun(out / "job.yaml", isolated_env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    _as_uninterrupted(out, reference_run)
    _say("torchrun", hang, stopped_at)
