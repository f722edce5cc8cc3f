"""Slurm preemption: from ``scancel --signal=USR1`` to the requeued job training again.

    .venv/bin/python bench/requeue.py

Uses the real test Slurm (``scripts/slurm_services.sh up``). Runs the smoke job
twice with the torchrun template: once leaving the requeued job to Slurm's own
requeue delay, once releasing it at once (``scontrol update StartTime=now``),
and prints where the time goes and how many steps were recomputed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.fixtures.slurm import scontrol_job  # noqa: E402

CLI = [sys.executable, "-m", "sft_cluster"]
CLUSTER = "cluster_configs/slurm-local-torchrun.yaml"


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def measure(tmp: Path, release: bool, env: dict[str, str]) -> dict[str, float]:
    run = tmp / ("released" if release else "default-delay")
    out = subprocess.run(
        [
            *CLI,
            "sbatch",
            "jobs/smoke.yaml",
            "--cluster",
            CLUSTER,
            f"output_uri={run}",
            "train.max_steps=60",
            "checkpoint.every_n_steps=10",
            "tracking=none",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    job_id = out.split("submitted")[1].split()[0]
    while not (run / "checkpoints" / "step-00000010" / "COMMITTED").exists():
        time.sleep(0.2)
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    while scontrol_job(job_id).get("JobState") not in ("PENDING", "REQUEUED"):
        time.sleep(0.2)
    requeued = time.time()
    if release:
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
    while scontrol_job(job_id).get("JobState") != "RUNNING":
        time.sleep(0.2)
    running = time.time()
    stopped_at = max(r["step"] for r in _records(run) if r["time"] < requeued)
    while not any(r["time"] > running for r in _records(run)):
        time.sleep(0.2)
    training = min(r["time"] for r in _records(run) if r["time"] > running)
    while scontrol_job(job_id).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED"):
        time.sleep(1)
    resumed_from = json.loads((run / "summary.json").read_text())["resumed_from"][0]
    return {
        "to_requeue": requeued - signalled,
        "slurm_delay": running - requeued,
        "to_first_step": training - running,
        "total": training - signalled,
        "recomputed": stopped_at - resumed_from,
    }


def main() -> None:
    subprocess.run(["bash", str(REPO / "scripts" / "slurm_services.sh"), "up"], check=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-requeue-", dir="/tmp"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SFT_CLUSTER_STATE_DIR": str(tmp / "state")}
    header = f"{'signal->requeued':>17}{'Slurm delay':>13}{'->first step':>14}{'total':>8}{'recomputed':>12}"
    print(f"{'':34}{header}")
    for release in (False, True):
        m = measure(tmp, release, env)
        label = "released at once" if release else "Slurm's default requeue delay"
        print(
            f"{label:34}{m['to_requeue']:>16.1f}s{m['slurm_delay']:>12.1f}s{m['to_first_step']:>13.1f}s"
            f"{m['total']:>7.1f}s{m['recomputed']:>12d}"
        )
        if not release:
            print(f"{'':34}share of the total that is Slurm's delay: {m['slurm_delay'] / m['total']:.2f}")


if __name__ == "__main__":
    main()
