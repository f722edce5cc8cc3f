"""The hang watchdog on the smoke job: one of its two workers is SIGSTOPped a few steps after the
step-10 commit; how long until every rank's stacks are written, the attempt has ended (the stopped
process is gone) and the resumed run trains its first step. Target: resumed within the limit + 60 s.
``--executor ray``: `sft-cluster run` (Ray Train restarts the group); ``torchrun``: the driver with
its torchrun executor, which exits 75 after the hang, started again at once (as a requeue would).

    .venv/bin/python bench/hang.py [--executor ray|torchrun] [--steps 60] [--min-limit 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "sft_cluster"]
TORCHRUN = [sys.executable, "-m", "sft_cluster.driver", "--executor=torchrun", "--nproc-per-node=2"]
WORKER = {"ray": "RayTrainWorker", "torchrun": "sft_cluster.train"}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait(condition, proc: subprocess.Popen, what: str, poll: float = 0.02):
    while not (found := condition()):
        if proc.poll() is not None:
            sys.exit(f"the run ended before {what}")
        time.sleep(poll)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--executor", choices=("ray", "torchrun"), default="ray")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--min-limit", type=float, default=5.0, help="watchdog.min_limit_s")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-hang-"))
    (tmp / "home").mkdir()
    out = tmp / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(tmp / "home"), "OMP_NUM_THREADS": "1"}
    job = [
        "jobs/smoke.yaml",
        f"train.max_steps={args.steps}",
        "checkpoint.every_n_steps=10",
        "tracking=none",
        "watchdog.step_timeout_s=60",  # saves, evaluations and warm-up; after it, 20 x the median
        f"watchdog.min_limit_s={args.min_limit}",
    ]
    command = [*CLI, "run", *job] if args.executor == "ray" else [*TORCHRUN, *job]
    proc = subprocess.Popen(
        [*command, f"output_uri={out}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics, events = out / "metrics.jsonl", out / "events.jsonl"
    committed = out / "checkpoints" / "step-00000010" / "COMMITTED"
    _wait(lambda: committed.exists() and len(_records(metrics)) >= 14, proc, "step 14")
    workers = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if WORKER[args.executor] in " ".join(p.cmdline())
    ]
    stopped = workers[-1]
    stopped.send_signal(signal.SIGSTOP)
    stopped_at = time.time()
    _wait(lambda: not stopped.is_running() or stopped.status() == psutil.STATUS_ZOMBIE, proc, "the kill")
    ended_at = time.time()
    hang = _wait(
        lambda: next((e for e in _records(events) if e["event"] == "hang"), None), proc, "the hang event"
    )
    stacks = max(p.stat().st_mtime for p in (out / "hangs" / f"attempt-{hang['attempt']}").iterdir())
    if args.executor == "torchrun":  # the driver exits 75; a requeue starts it again
        if proc.wait() != 75:
            sys.exit(f"the torchrun driver exited {proc.returncode}, not 75")
        proc = subprocess.Popen(
            [*TORCHRUN, str(out / "job.yaml")],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    resumed = _wait(
        lambda: next(
            (e for e in _records(events) if e["event"] == "resumed" and e["time"] > stopped_at), None
        ),
        proc,
        "the resume",
    )
    first = _wait(
        lambda: next((r for r in _records(metrics) if r["time"] > resumed["time"]), None), proc, "a step"
    )
    if proc.wait() != 0:
        sys.exit(f"the run failed (exit {proc.returncode})")
    summary = json.loads((out / "summary.json").read_text())
    shutil.rmtree(tmp, ignore_errors=True)
    limit, resumed_s = hang["limit_s"], first["time"] - stopped_at
    print(f"load average {os.getloadavg()[0]:.1f}; smoke job, {args.steps} steps, checkpoints every 10")
    print(f"executor {args.executor}")
    print(f"hang: rank {hang['rank']} at step {hang['step']} ({hang['phase']}), limit {limit:.1f} s")
    print("| from the SIGSTOP to | seconds |")
    print("| --- | ---: |")
    print(f"| hang declared (no heartbeat for {hang['seconds']:.1f} s) | {hang['time'] - stopped_at:.1f} |")
    print(f"| every rank's stacks written | {stacks - stopped_at:.1f} |")
    print(f"| attempt ended (stopped worker gone) | {ended_at - stopped_at:.1f} |")
    print(f"| first step after resume (from step {resumed['step']}) | {resumed_s:.1f} |")
    print(f"run: {summary['status']}, restarts {summary['restarts']}, wall {summary['wall_seconds']:.1f} s")
    verdict = "met" if resumed_s <= limit + 60 else "NOT met"
    print(f"target resumed within limit + 60 s = {limit + 60:.1f} s: {verdict}")


if __name__ == "__main__":
    main()
