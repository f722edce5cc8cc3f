"""Goodput of the smoke job as `sft-cluster run` reports it, uninterrupted and with two injected
faults (a Ray Train worker SIGKILLed after the step-10 commit and again after the step-30 one),
and how well the time split adds up to the wall time (target: within 2%).

With ``--random-faults K`` a third run kills a worker K times, each at a random moment of the
checkpoint interval after a commit (steps 10, 30, 50, ...), and its measured goodput is set beside
the model's (docs/goodput.md, ``interval.expected_goodput``) fed with that run's measured interval,
stall, restart time and failure rate: the check of the model against a run with injected faults.

    .venv/bin/python bench/goodput.py [--steps 60] [--random-faults 4 --steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from sft_cluster.tracking.goodput import PARTS  # noqa: E402
from sft_cluster.train.interval import expected_goodput  # noqa: E402

CLI = [sys.executable, "-m", "sft_cluster"]


EVERY = 10  # checkpoint.every_n_steps of every run here


def _kill_a_worker_after_commit(proc: subprocess.Popen, run: Path, step: int, delay_s: float) -> None:
    marker = run / "checkpoints" / f"step-{step:08d}" / "COMMITTED"
    while not marker.exists():
        if proc.poll() is not None:
            sys.exit(f"the run ended before the step-{step} commit")
        time.sleep(0.1)
    time.sleep(delay_s)  # steps past the commit, which the restart loses
    workers = psutil.Process(proc.pid).children(recursive=True)
    next(p for p in workers if "RayTrainWorker" in " ".join(p.cmdline())).send_signal(signal.SIGKILL)


def run(tmp: Path, steps: int, faults: list[tuple[int, float]], name: str) -> dict:
    """The summary of the smoke job killed once after each (commit step, delay) of ``faults``."""
    out = tmp / name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(tmp / "home")}
    job = [
        "jobs/smoke.yaml",
        f"train.max_steps={steps}",
        f"checkpoint.every_n_steps={EVERY}",
        "tracking=none",
    ]
    proc = subprocess.Popen(
        [*CLI, "run", *job, f"output_uri={out}", f"checkpoint.max_failures={len(faults) + 1}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for step, delay_s in faults:
        _kill_a_worker_after_commit(proc, out, step, delay_s)
    if proc.wait() != 0:
        sys.exit(f"the run with {len(faults)} faults failed (exit {proc.returncode})")
    return json.loads((out / "summary.json").read_text())


def model_check(summary: dict, steps: int, faults: int) -> None:
    """The run's goodput over what the model counts (productive, checkpoint, lost, restart: no
    start-up, evaluation, data wait or finish) beside the model's, fed with the run's own figures."""
    split = {part: summary["time_split"][f"{part}_seconds"] for part in PARTS}
    window = split["productive"] + split["checkpoint"] + split["lost"] + split["restart"]
    interval_s = split["productive"] / steps * EVERY
    stall_s = split["checkpoint"] / (steps // EVERY)
    restart_s = split["restart"] / faults
    predicted = expected_goodput(interval_s, stall_s, window / faults, restart_s)
    print(
        f"{faults} faults at random moments: measured {split['productive'] / window:.1%} of "
        f"{window:.1f} s, model {predicted:.1%} (interval {interval_s:.2f} s, stall {stall_s:.2f} s, "
        f"restart {restart_s:.1f} s, MTTF {window / faults:.1f} s); lost per failure measured "
        f"{split['lost'] / faults:.2f} s, model half a cycle {(interval_s + stall_s) / 2:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--random-faults", type=int, default=0, help="the run that checks the model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-goodput-"))
    (tmp / "home").mkdir()
    summaries = {0: run(tmp, args.steps, [], "none"), 2: run(tmp, args.steps, [(10, 1.0), (30, 1.0)], "two")}
    if args.random_faults:
        # A kill at a uniform moment of the interval after a commit, as the model's failures come.
        cycle_s = summaries[0]["time_split"]["productive_seconds"] / args.steps * EVERY
        rng = random.Random(args.seed)
        commits = range(EVERY, 2 * EVERY * args.random_faults, 2 * EVERY)
        random_run = run(tmp, args.steps, [(c, rng.uniform(0, cycle_s)) for c in commits], "random")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.1f}; smoke job, {args.steps} steps, checkpoints every 10")
    print("| part | no fault (s) | two worker kills (s) |")
    print("| --- | ---: | ---: |")
    for part in PARTS:
        cells = " | ".join(f"{s['time_split'][f'{part}_seconds']:.1f}" for s in summaries.values())
        print(f"| {part.replace('_', ' ')} | {cells} |")
    for key, label in (("wall_seconds", "wall time"), ("unaccounted_seconds", "unaccounted")):
        print(f"| {label} | " + " | ".join(f"{s['time_split'][key]:.2f}" for s in summaries.values()) + " |")
    print("| goodput | " + " | ".join(f"{s['goodput']:.1%}" for s in summaries.values()) + " |")
    print("| restarts | " + " | ".join(str(s["restarts"]) for s in summaries.values()) + " |")
    for faults, summary in summaries.items():
        split = summary["time_split"]
        parts = sum(split[f"{part}_seconds"] for part in PARTS)
        off = abs(parts - split["wall_seconds"]) / split["wall_seconds"]
        print(f"{faults} faults: the parts add up to the wall time within {off:.2%} (target 2%)")
    if args.random_faults:
        model_check(random_run, args.steps, args.random_faults)


if __name__ == "__main__":
    main()
