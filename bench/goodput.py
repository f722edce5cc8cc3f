"""Goodput of the smoke job as `sft-cluster run` reports it, uninterrupted and with two injected
faults (a Ray Train worker SIGKILLed after the step-10 commit and again after the step-30 one),
and how well the time split adds up to the wall time (target: within 2%).

    .venv/bin/python bench/goodput.py [--steps 60]
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
sys.path.insert(0, str(REPO))
from sft_cluster.tracking.goodput import PARTS  # noqa: E402

CLI = [sys.executable, "-m", "sft_cluster"]


def _kill_a_worker_after_commit(proc: subprocess.Popen, run: Path, step: int) -> None:
    marker = run / "checkpoints" / f"step-{step:08d}" / "COMMITTED"
    while not marker.exists():
        if proc.poll() is not None:
            sys.exit(f"the run ended before the step-{step} commit")
        time.sleep(0.1)
    time.sleep(1.0)  # a few steps past the commit, so the restart loses some
    workers = psutil.Process(proc.pid).children(recursive=True)
    next(p for p in workers if "RayTrainWorker" in " ".join(p.cmdline())).send_signal(signal.SIGKILL)


def run(tmp: Path, steps: int, faults: list[int]) -> dict:
    out = tmp / f"faults-{len(faults)}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(tmp / "home")}
    job = ["jobs/smoke.yaml", f"train.max_steps={steps}", "checkpoint.every_n_steps=10", "tracking=none"]
    proc = subprocess.Popen(
        [*CLI, "run", *job, f"output_uri={out}", f"checkpoint.max_failures={len(faults) + 1}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for step in faults:
        _kill_a_worker_after_commit(proc, out, step)
    if proc.wait() != 0:
        sys.exit(f"the run with {len(faults)} faults failed (exit {proc.returncode})")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-goodput-"))
    (tmp / "home").mkdir()
    summaries = {0: run(tmp, args.steps, []), 2: run(tmp, args.steps, [10, 30])}
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


if __name__ == "__main__":
    main()
