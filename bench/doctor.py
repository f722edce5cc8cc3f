"""How long `sft-cluster doctor` takes on a good setup, per cluster kind, against the local services;
beside it, `sft-cluster validate` of the same job (the floor: start the CLI, read the job).

    .venv/bin/python bench/doctor.py [--repeats 3]

Starts SeaweedFS (the output goes to a bucket) and its own Ray head (2 CPUs, free ports); the
Slurm row runs when `sinfo` answers (`make slurm-services`). Target: under 10 s each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.fixtures.ray_head import start_ray_head, stop_ray_head  # noqa: E402
from tests.fixtures.s3 import seaweedfs  # noqa: E402

CLI = [sys.executable, "-m", "sft_cluster"]


def timed(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run([*CLI, *args], cwd=REPO, env=env, capture_output=True, text=True, check=False)
    took = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-doctor-"))
    (tmp / "s3").mkdir()
    rows: list[tuple[str, float, float]] = []
    with seaweedfs(tmp / "s3") as server:
        bucket = server.make_bucket()
        env = {**os.environ, **server.env(), "HF_HUB_OFFLINE": "1", "HOME": str(tmp)}
        job = ["jobs/smoke.yaml", f"output_uri=s3://{bucket}/run", f"storage.endpoint_url={server.endpoint}"]
        head = start_ray_head(num_cpus=2)
        try:
            ray_file = head.cluster_file(tmp / "ray.yaml")
            clusters = {"local": [], "ray": ["--cluster", str(ray_file)]}
            if shutil.which("sinfo") and subprocess.run(["sinfo"], capture_output=True).returncode == 0:
                clusters["slurm"] = ["--cluster", "cluster_configs/slurm-local.yaml"]
            ray_env = {**env, **head.env, **server.env()}
            for kind, extra in clusters.items():
                use = ray_env if kind == "ray" else env
                doctor = [timed(["doctor", *job, *extra], use) for _ in range(args.repeats)]
                validate = [timed(["validate", *job, *extra], use) for _ in range(args.repeats)]
                rows.append((kind, statistics.median(doctor), statistics.median(validate)))
        finally:
            stop_ray_head(head)
    shutil.rmtree(tmp, ignore_errors=True)
    load = os.getloadavg()[0]
    print(f"median of {args.repeats}, load average {load:.1f}")
    print("| cluster | doctor (s) | validate (s) | doctor - validate (s) | target |")
    print("| --- | ---: | ---: | ---: | --- |")
    for kind, doctor_s, validate_s in rows:
        verdict = "met" if doctor_s < 10 else "not met"
        extra = doctor_s - validate_s
        print(f"| {kind} | {doctor_s:.1f} | {validate_s:.1f} | {extra:.1f} | < 10 s: {verdict} |")


if __name__ == "__main__":
    main()
